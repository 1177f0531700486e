"""`jaxllm <command>`: each command is a small function registered in COMMANDS."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError

COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {}


def command(name: str, help_text: str):
    def register(fn):
        COMMANDS[name] = (fn, help_text)
        return fn

    return register


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"jaxllm {prog}", description=description,
                                     epilog="overrides: dotted keys, e.g. train.steps=2000 optim.lr=3e-4")
    parser.add_argument("--config", help="YAML config (see configs/); defaults are the tiny model on the "
                                         "built-in corpus")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser


def _print_keys(cls=config_lib.Config) -> None:
    import dataclasses
    import typing

    def walk(c, prefix, defaults):  # defaults: the section's default instance (a stage may override it)
        for f in dataclasses.fields(c):
            typ = typing.get_type_hints(c)[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, prefix + f.name + ".", getattr(defaults, f.name))
            else:
                print(f"{prefix}{f.name} = {getattr(defaults, f.name)!r}")

    walk(cls, "", cls())


def _stage(argv: list[str], name: str, description: str, module: str, cfg_cls: str, loader: str) -> int:
    """A config-driven stage command: YAML + overrides -> module.run(cfg); --help-config lists the keys."""
    import importlib

    args = _config_parser(name, description).parse_args(argv)
    stage = importlib.import_module(f"jaxllm.stages.{module}")
    if args.help_config:
        _print_keys(getattr(stage, cfg_cls) if cfg_cls else config_lib.Config)
        return 0
    load = getattr(stage, loader) if loader else config_lib.load
    print(f"done: {stage.run(load(args.config, args.overrides))}")
    return 0


@command("pretrain", "next-token pre-training (default: tiny model, built-in corpus, CPU-friendly)")
def pretrain_cmd(argv: list[str]) -> int:
    return _stage(argv, "pretrain", "Pre-train a decoder on packed documents.", "pretrain", "", "")


@command("data", "data build --config configs/data/example.yaml: filter, dedup, tokenize, write shards")
def data_cmd(argv: list[str]) -> int:
    if not argv or argv[0] != "build":
        print("usage: jaxllm data build --config <build.yaml> [key=value ...]  (see docs/data.md)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    args = _config_parser("data build", "Build training shards from text, JSONL, Parquet and the built-in "
                                        "corpus.").parse_args(argv[1:])
    from jaxllm.data import build

    if args.help_config:
        _print_keys(build.BuildConfig)
        return 0
    cfg = build.load_config(args.config, args.overrides)
    report = build.build(cfg)
    print(build.format_report(report))
    print(f"done: {cfg.output} (report: {cfg.output}/report.json)")
    return 0


@command("sft", "supervised fine-tuning on instruction / chat records (default: built-in stdlib set)")
def sft_cmd(argv: list[str]) -> int:
    return _stage(argv, "sft", "Fine-tune a run on instruction or chat data (loss on responses only).", "sft",
                  "SFTConfig", "load")



@command("reward", "train a reward model on preference pairs; `reward score` writes rewards")
def reward_cmd(argv: list[str]) -> int:
    from jaxllm.stages import reward

    if argv[:1] == ["score"]:
        parser = argparse.ArgumentParser(prog="jaxllm reward score", description="Score responses with a reward run.")
        parser.add_argument("--run", required=True, help="reward run directory, e.g. runs/rm")
        parser.add_argument("--input", required=True, help="JSONL of {prompt, response} or preference records")
        parser.add_argument("--output", help="output JSONL (default: stdout)")
        parser.add_argument("--batch-size", type=int, default=32)
        args = parser.parse_args(argv[1:])
        out = open(args.output, "w") if args.output else sys.stdout
        try:
            counts = reward.score_file(args.run, args.input, out, batch_size=args.batch_size)
        finally:
            if args.output:
                out.close()
        print(f"scored {counts.kept} records ({counts.bad} skipped)", file=sys.stderr)
        return 0
    return _stage(argv, "reward", "Train a reward model (backbone + scalar head) on preference pairs; "
                  "`jaxllm reward score --run R --input F` scores records.", "reward", "RewardConfig", "load")


@command("ppo", "RLHF with PPO from an SFT run and a reward run or a reward function (see docs/ppo.md)")
def ppo_cmd(argv: list[str]) -> int:
    return _stage(argv, "ppo", "PPO on a policy (policy.run=<sft run>) with reward.run=<reward run> or "
                  "reward.fn=module:function.", "ppo", "PPOStageConfig", "load")


@command("pipeline", "pretrain -> SFT -> reward model -> PPO with tiny configs on the built-in data (CPU)")
def pipeline_cmd(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm pipeline", description="Run every stage with tiny settings; "
                                     "each stage starts from the previous one; a finished stage is skipped.")
    parser.add_argument("--name", default="pipeline", help="run-name prefix: runs/<name>-pretrain, ...")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--size", default="tiny", choices=("tiny", "smoke"), help="smoke: seconds, for tests")
    args = parser.parse_args(argv)
    from jaxllm.stages import pipeline

    pipeline.run(args.name, args.runs_dir, size=args.size)
    return 0


@command("generate", "sample continuations from a trained run (KV cache; JSONL in, JSONL out)")
def generate_cmd(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm generate", description="Sample from a trained run.")
    parser.add_argument("--run", required=True, help="run directory, e.g. runs/tiny")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    parser.add_argument("--prompts", help='JSONL file, one {"prompt": "..."} per line')
    parser.add_argument("--output", help="write JSONL here instead of stdout")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--logprobs", default="policy", choices=("policy", "tempered", "sampler"),
                        help="distribution of the reported logprob (see docs/generate.md)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompts:
        parser.error("give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    from jaxllm.generate import sampling, textgen

    prompts = list(args.prompt or []) + (textgen.read_prompts(args.prompts) if args.prompts else [])
    config = sampling.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, logprobs=args.logprobs)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for record in textgen.generate_texts(args.run, prompts, config, batch_size=args.batch_size, seed=args.seed):
            print(json.dumps(record), file=out, flush=True)
    finally:
        if args.output:
            out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxllm <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"jaxllm: unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
              + f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    from jaxllm import logging as jlog

    jlog.setup()
    try:
        return COMMANDS[name][0](rest)
    except JaxllmError as e:  # config, data, tokenizer, checkpoint, training: one line each
        print(f"jaxllm {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
