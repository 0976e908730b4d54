"""scalebio: learn data-mixture weights by first-order bilevel optimization (ScaleBiO).

Run `scalebio COMMAND --help` for a command's options. Commands import their modules lazily, so
`validate` never loads the LLM stack."""

from __future__ import annotations

import argparse
import sys


def _validate(argv: list[str]) -> int:
    from scalebio.theory.validate import main

    return main(argv)


def _reweight(argv: list[str]) -> int:
    from scalebio.llm.cli import reweight_main

    return reweight_main(argv)


def _mix(argv: list[str]) -> int:
    from scalebio.llm.cli import mix_main

    return mix_main(argv)


def _demo(argv: list[str]) -> int:
    from scalebio.llm.cli import demo_main

    return demo_main(argv)


def _sft(argv: list[str]) -> int:
    from scalebio.llm.cli import sft_main

    return sft_main(argv)


def _evaluate(argv: list[str]) -> int:
    from scalebio.llm.cli import evaluate_main

    return evaluate_main(argv)


def _compare(argv: list[str]) -> int:
    from scalebio.llm.cli import compare_main

    return compare_main(argv)


def _baseline(argv: list[str]) -> int:
    from scalebio.llm.cli import baseline_main

    return baseline_main(argv)


def _plan(argv: list[str]) -> int:
    from scalebio.llm.cli import plan_main

    return plan_main(argv)


def _agree(argv: list[str]) -> int:
    from scalebio.llm.cli import agree_main

    return agree_main(argv)


COMMANDS = {
    "agree": (_agree, "do runs with different seeds agree? spreads, rank agreement, mean weights"),
    "baseline": (_baseline, "mixture weights by uniform, size, DoReMi, RHO-LOSS or LESS"),
    "compare": (_compare, "ScaleBiO vs the baselines: weights, mix, sft, evaluate over seeds"),
    "demo": (_demo, "learn weights on a built-in task with known answers (no download)"),
    "mix": (_mix, "draw a training mixture of N examples from learned weights"),
    "plan": (_plan, "check a config and predict per-GPU memory before loading weights"),
    "reweight": (_reweight, "learn mixture weights over the sources of a config"),
    "sft": (_sft, "fine-tune a model on a mixture (scalebio mix output)"),
    "evaluate": (_evaluate, "loss per source and answer accuracy of a fine-tuned model"),
    "validate": (_validate, "check every theoretical claim on the toy problems; write a report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the `deepspeed` launcher inserts --local_rank=N; ranks are read from the environment
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    parser = argparse.ArgumentParser(prog="scalebio", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
