"""Train a MoE transformer: `python train.py [--config=configs/x.py[:variant]] [--config.a.b=v]`.

With no arguments it trains configs/default.py. gin works too, on the same config tree:
`python train.py --gin_file=configs/default.gin --gin_param='moe.top_k=4'` (the gin bindings
are applied on top of --config). On a CPU-only machine JAX is given 8 host devices (before it
initialises) so that the expert-parallel path really runs; `--host_devices` changes that.
"""

from __future__ import annotations

import os
import sys


def _host_devices(argv: list[str]) -> int:
    value = "8"
    for i, arg in enumerate(argv):
        if arg.startswith("--host_devices="):
            value = arg.split("=", 1)[1]
        elif arg == "--host_devices" and i + 1 < len(argv):
            value = argv[i + 1]
    if not value.isdigit() or int(value) < 1:
        sys.exit(f"error: --host_devices={value} must be a positive integer.")
    return int(value)


# Before JAX initialises: only the CPU backend reads this flag, so GPU/TPU runs are unaffected.
from occult_jax.host_devices import request_cpu_devices  # noqa: E402

request_cpu_devices(_host_devices(sys.argv))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(HERE, "configs", "default.py"),
                                "Config file (configs/*.py[:variant]).", lock_config=False)
flags.DEFINE_multi_string("gin_file", [], "gin files binding config fields (moe.top_k = 4).")
flags.DEFINE_multi_string("gin_param", [], "gin bindings, e.g. 'moe.top_k=4'.")
flags.DEFINE_string("workdir", None, "Overrides config.workdir.")
flags.DEFINE_integer("host_devices", 8, "CPU devices JAX fakes when it has no accelerator.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from occult_jax import frontends, train_lib

    config = FLAGS.config
    try:
        if FLAGS.gin_file or FLAGS.gin_param:
            config = frontends.apply_gin(config, FLAGS.gin_file, FLAGS.gin_param)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        train_lib.train_and_evaluate(config, FLAGS.workdir or config.workdir)
    except train_lib.ConfigError as e:  # bad config values: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
