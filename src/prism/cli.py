"""The `prism` command: subcommands built from one table of flags, each importing its code only
when it runs (so `prism --help`, `prism config` and `prism personas` never load torch)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import traceback
from typing import Any, Callable

from prism.config import EVAL_PRESETS, PRESETS, STAGES, STUDY_PRESETS
from prism.errors import ConfigError, PrismError

EXIT_USAGE = 2
LM_EVAL = "lm-eval"


# ----- the flag vocabulary: each flag is defined once and means the same in every subcommand ------
def _names(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected name=value pairs separated by commas, got {part!r}")
        out[name.strip()] = value.strip()
    return out


def _limits(text: str) -> dict[str, int]:
    out = {}
    for name, value in _pairs(text).items():
        if not value.isdigit():
            raise argparse.ArgumentTypeError(f"limits take name=N pairs (e.g. mmlu=100,mtbench=16), got {name}={value}")
        out[name] = int(value)
    return out


DTYPES = ["auto", "float32", "bfloat16", "float16"]
# flag -> (help, the settings key it sets or None, argparse options)
FLAGS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    # what and where
    "--model": ("the model: 'embedded' (default), a local model directory or a hub id", "model", {}),
    "--out": ("output directory (resumable: run the same command again after a kill)", None, {}),
    "--config": ("YAML file of settings; overrides the preset, flags override it", None, {}),
    "--data": ("benchmark data folder (default: ../shared/benchmarks or $PRISM_BENCHMARKS)", "data", {}),
    "--quiet": ("no progress bars or info logs", None, {"action": "store_true"}),
    "--seed": ("random seed", "seed", {"type": int}),
    # personas
    "--personas": ("extra personas: a directory of YAML files or one YAML file", "persona_dir", {}),
    "--only": ("comma-separated persona names to use (default: all in the registry)", "personas", {"type": _names}),
    "--length": ("persona length", "persona_length", {"choices": ["long", "short", "minimal"]}),
    "--placement": ("where the persona goes: the system turn or the first user turn", "placement",
                    {"choices": ["system", "user"]}),
    "--persona-map": ("category=persona overrides of the expert match, e.g. other=critic", "persona_map",
                      {"type": _pairs}),
    # model loading
    "--dtype": ("weights dtype (bfloat16 is faster on CPUs with bf16 units)", "dtype", {"choices": DTYPES}),
    "--infer-dtype": ("cast the weights to this dtype for stages 1-3 and the teacher logits; training keeps "
                      "--dtype", "infer_dtype", {"choices": ["model", "auto", "float32", "bfloat16", "float16"]}),
    "--device": ("where the model runs", "device", {"choices": ["auto", "cpu", "cuda", "mps"]}),
    "--batch-size": ("prompts per forward pass", "batch_size", {"type": int}),
    "--trust-remote-code": ("allow model repositories to run their own code (off by default)", "trust_remote_code",
                            {"action": "store_true", "default": None}),
    # the pipeline
    "--n": ("queries per persona", "queries.n_per_persona", {"type": int}),
    "--judge": ("stage-3 judge kind", "judge.kind", {"choices": ["prompted", "likelihood", "generate", "program"]}),
    "--generator-url": ("generate stages 1-3 on this OpenAI-compatible server (vLLM, SGLang, prism serve); key in "
                        "PRISM_GENERATOR_API_KEY", "generator_url", {}),
    "--generator-served-model": ("the model's name on that server (default: its first)", "generator_model", {}),
    "--generator-concurrency": ("requests in flight to that server", "generator_concurrency", {"type": int}),
    "--engine": ("what generates: torch, llamacpp (in-process llama.cpp), vllm (vLLM's server as a child "
                 "process; Python in PRISM_VLLM_PYTHON) or auto (llamacpp to serve when it can load the model, "
                 "torch for bulk stages: benchmarks/engines.py); gate, scores and training stay in torch",
                 "engine", {"choices": ["auto", "torch", "llamacpp", "vllm"]}),
    "--gguf": ("the model as a GGUF file for the llamacpp engine (the embedded model needs none)", "gguf", {}),
    "--vllm-args": ("more flags for the vllm engine's server, quoted, e.g. '--tensor-parallel-size 2' (one flag alone: --vllm-args=--enforce-eager)",
                    "vllm_args", {"type": shlex.split}),
    # judges (in `run`, --judge-model is the stage-3 judge; in eval and study, the MT-Bench judge)
    "--judge-model": ("another local model (directory or hub id) as the judge instead of the model itself",
                      "judge.model", {}),
    "--judge-url": ("an OpenAI-compatible endpoint as the MT-Bench judge", "judge.url", {}),
    "--judge-served-model": ("the judge's model name at --judge-url (default: its first)", "judge.served_model", {}),
    "--judge-key-env": ("environment variable holding the --judge-url API key", "judge.key_env", {}),
    "--refusal": ("refusal classifier: the documented patterns, or the model as a judge", "refusal",
                  {"choices": ["pattern", "judge"]}),
    "--limit": ("per-benchmark item limits, e.g. mmlu=200,mtbench=80,harmbench=100", "limits", {"type": _limits}),
    "--benchmarks": ("comma-separated benchmarks to score", "benchmarks", {"type": _names}),
    # eval and study
    "--suite": ("paper: Table 1 on the benchmarks; contexts: prism's context suite on a context run", "suite",
                {"choices": ["paper", "contexts"]}),
    "--systems": ("comma-separated subset of base,persona,ungated,prism", "systems", {"type": _names}),
    "--shots": ("MMLU few-shot examples from the dev file", "mmlu_shots", {"type": int}),
    "--lengths": ("comma-separated persona lengths of the grid (long,short,minimal)", "lengths", {"type": _names}),
    "--placements": ("comma-separated placements of the grid (system,user)", "placements", {"type": _names}),
    "--cross": ("reference: every persona at the reference cell only; full: everywhere", "cross",
                {"choices": ["reference", "full"]}),
    # generation from a finished run
    "--max-new-tokens": ("reply length limit", None, {"type": int, "default": 256}),
    "--temperature": ("0 = greedy", None, {"type": float, "default": 0.0}),
    "--top-p": ("nucleus sampling mass", None, {"type": float, "default": 1.0}),
    "--adapter": ("force the route instead of asking the gate: on (the only adapter), off, or an adapter name",
                  None, {"default": "auto"}),
    "--context": ("the context to use within its gate class (e.g. one user's memory)", None, {}),
}

RUN_SETTINGS = ["--model", "--config", "--personas", "--only", "--length", "--placement", "--n", "--judge",
                "--judge-model", "--seed", "--batch-size", "--dtype", "--infer-dtype", "--device",
                "--trust-remote-code", "--generator-url", "--generator-served-model", "--generator-concurrency",
                "--engine", "--gguf", "--vllm-args"]
JUDGE_SETTINGS = ["--judge-model", "--judge-url", "--judge-served-model", "--judge-key-env", "--refusal"]
GENERATION = ["--max-new-tokens", "--temperature", "--top-p", "--seed", "--adapter", "--context", "--engine", "--gguf"]


def _add(p: argparse.ArgumentParser, names: list[str], study_models: bool = False) -> None:
    for name in names:
        help_, _, kwargs = FLAGS[name]
        if name == "--model" and study_models:  # the study compares several models: repeat the flag
            kwargs = {**kwargs, "action": "append"}
        p.add_argument(name, help=help_, dest=name.lstrip("-").replace("-", "_"), **kwargs)


def _overrides(args, names: list[str], rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Settings overrides from the flags given, through the one flag -> key table."""
    out = {}
    for name in names:
        key = (rename or {}).get(name, FLAGS[name][1])
        value = getattr(args, name.lstrip("-").replace("-", "_"), None)
        if key and value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:  # nor transformers' weight-loading bar (it reads this variable when imported)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


# ----- subcommands ---------------------------------------------------------------------------
def _run_config(args):
    """The settings a run command means: preset -> file -> flags; but resuming a run without naming a
    preset starts from the run's own settings instead (a preset may have changed since), so a file
    or flags change only what they name (e.g. a stage that has not begun)."""
    from prism.config import load_config
    from prism.run import RunDir

    out = getattr(args, "out", None)
    base = RunDir(out).config().to_dict() if out and args.preset is None and RunDir(out).exists else None
    return load_config(args.preset, args.config, _overrides(args, RUN_SETTINGS), base=base)


def cmd_run(args) -> int:
    from prism.pipeline import run_pipeline

    run = run_pipeline(_run_config(args), args.out, until=args.until, quiet=args.quiet)
    print(_stage_table(run.path, run.manifest))
    return 0


def _stage_table(path, manifest: dict) -> str:
    lines = [f"run {path} (model {manifest['config']['model']}); details in {path}/manifest.json",
             f"{'stage':<10} {'status':<8} {'seconds':>8}  facts"]
    for name, info in manifest["stages"].items():
        facts = {k: v for k, v in info.items()
                 if k not in ("status", "seconds", "started", "finished") and not isinstance(v, (dict, list))}
        secs = f"{info['seconds']:.1f}" if "seconds" in info else "-"
        lines.append(f"{name:<10} {info.get('status', 'pending'):<8} {secs:>8}  {facts}")
    return "\n".join(lines)


def cmd_config(args) -> int:
    import yaml

    print(yaml.safe_dump(_run_config(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_personas(args) -> int:
    from prism.contexts import ContextRegistry

    reg = ContextRegistry.load(args.personas)
    if args.show:
        p = reg.get(args.show)
        print(json.dumps({"name": p.name, "kind": p.kind, "category": p.category, "source": p.source,
                          "texts": p.texts}, indent=2))
        return 0
    for p in reg.personas.values():
        lengths = ",".join(p.texts)
        print(f"{p.name:<16} {p.kind:<10} {p.category or '-':<12} {lengths:<20} {p.description}")
    return 0


def _load_routed(args):
    from prism.model.engines import pick_engine
    from prism.routed import PrismModel
    from prism.run import RunDir

    config = RunDir(args.run_dir).require("gate", "distill").config()
    engine = pick_engine(args.engine or "auto", config.model, args.gguf, config.device, job="serve")
    if engine == "vllm":
        raise ConfigError("--engine vllm serves many clients: use prism serve --engine vllm (generate and chat "
                          "take torch or llamacpp)")
    if engine == "llamacpp":
        routed = PrismModel.load_on_engine(args.run_dir, gguf=args.gguf, slots=1, context=8192)  # one conversation
    else:
        routed = PrismModel.load(args.run_dir)
    routed.route_every_turn = getattr(args, "route_every_turn", False)
    return routed



def _forced(args) -> bool | str | None:
    return {"auto": None, "on": True, "off": False}.get(args.adapter, args.adapter)


def _route_line(route) -> str:
    if route.forced:
        return f"[route: {route.name}, forced]"
    return (f"[route: {route.name} (p={route.probability:.3f}; runner-up {route.runner_up} "
            f"p={route.runner_up_probability:.3f}; {route.rule})]")


def _check_generation(args) -> None:
    """The sampling flags, checked before the model loads."""
    from prism.errors import ConfigError

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature <= 2:
        raise ConfigError(f"--temperature must be between 0 and 2, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be above 0 and at most 1, got {args.top_p}")


def cmd_generate(args) -> int:
    _check_generation(args)
    model = _load_routed(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    reply = model.chat(messages, args.max_new_tokens, args.temperature, args.top_p, args.seed, _forced(args),
                       args.context)
    if args.json:
        print(json.dumps(reply.to_dict(), ensure_ascii=False))
    else:
        print(reply.text)
        print(_route_line(reply.route), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    _check_generation(args)
    model = _load_routed(args)
    print("PRISM chat. /reset starts a new conversation, /quit leaves.", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages = []
            print("(new conversation)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        reply = model.chat(messages, args.max_new_tokens, args.temperature, args.top_p, args.seed, _forced(args),
                       args.context)
        messages.append({"role": "assistant", "content": reply.text})
        print(f"prism> {reply.text}\n{_route_line(reply.route)}", flush=True)


EVAL_SETTINGS = ["--suite", "--data", "--limit", "--systems", "--benchmarks", "--shots", "--length", "--placement",
                 "--persona-map", "--seed", "--engine", "--gguf", "--vllm-args", *JUDGE_SETTINGS]


def cmd_eval(args) -> int:
    from pathlib import Path

    from prism.eval import run_eval

    results = run_eval(args.out, run_dir=args.run_dir, model=args.model, preset=args.preset,
                       config_file=args.config, overrides=_overrides(args, EVAL_SETTINGS), quiet=args.quiet)
    out = Path(results["out"])
    if "suite" in results:
        print((out / "suite.md").read_text())
        print(f"results: {out / 'suite.json'}")
        return 0
    print((out / "table.md").read_text())
    print(f"results: {out / 'results.json'}; plots: {', '.join(results.get('plots', []))}")
    return 0


STUDY_SETTINGS = ["--model", "--data", "--only", "--personas", "--lengths", "--placements", "--cross",
                  "--benchmarks", "--limit", "--persona-map", "--seed", "--dtype", "--batch-size", *JUDGE_SETTINGS]


def cmd_study(args) -> int:
    from pathlib import Path

    from prism.study import run_study

    overrides = _overrides(args, STUDY_SETTINGS, rename={"--model": "models"})
    results = run_study(args.out, preset=args.preset, config_file=args.config, overrides=overrides,
                        quiet=args.quiet)
    out = Path(args.out)
    print((out / "findings.md").read_text())
    print(f"report: {out / 'report.html'}; results: {out / 'results.json'}; figures: {out / 'figures'}; "
          f"{results['seconds']:.0f}s")
    return 0


def cmd_serve(args) -> int:
    from prism.serve.server import serve

    serve(args.run_dir, args.host, args.port, args.api_key, upstream=args.upstream, upstream_base=args.upstream_base,
          upstream_adapter=args.upstream_adapter, upstream_api_key=args.upstream_api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
          context_length=args.context_length, allowed_host=args.allowed_host, engine=args.engine or "auto",
          gguf=args.gguf, vllm_args=args.vllm_args, dtype=args.serve_dtype)
    return 0


def cmd_export_adapter(args) -> int:
    from prism.export import export_adapter

    print(json.dumps(export_adapter(args.run_dir, args.out, force=args.force, format=args.format, gguf=args.gguf),
                     indent=2))
    return 0


# ----- the parser ----------------------------------------------------------------------------------
RUN_DIR = ("run_dir", {"help": "a finished run directory"})


def _preset(presets) -> tuple:
    return ("--preset", {"choices": sorted(presets), "help": "named settings (default: quick)"})


# name -> (help, handler, arguments: a FLAGS name, or (name, argparse options) for one of its own)
SUBCOMMANDS: dict[str, tuple[str, Callable, list]] = {
    "run": ("run the pipeline (resumes a run in --out)", cmd_run, [
        *RUN_SETTINGS, _preset(PRESETS), ("--until", {"choices": STAGES, "help": "stop after this stage"}), "--quiet",
        ("--out", {"required": True, "help": FLAGS["--out"][0]})]),
    "config": ("print the resolved run settings as YAML", cmd_config, [*RUN_SETTINGS, _preset(PRESETS)]),
    "personas": ("list the persona registry", cmd_personas, ["--personas", ("--show", {"help": "one persona's texts"})]),
    "eval": ("base / expert prompting / ungated / PRISM on MT-Bench, MMLU, safety, XSTest", cmd_eval, [
        ("run_dir", {"nargs": "?", "help": "a finished run directory (all four systems)"}),
        ("--model", {"help": "evaluate a model without a run: base and persona rows only"}),
        ("--out", {"help": "results directory (resumable; default RUN_DIR/eval)"}), _preset(EVAL_PRESETS),
        "--config", *EVAL_SETTINGS, "--quiet"]),
    "study": ("the persona-effect study: persona x length x placement x task, with CIs", cmd_study, [
        ("--out", {"required": True, "help": "results directory (resumable; a re-run reuses every cached row)"}),
        _preset(STUDY_PRESETS), "--config", "--quiet", *STUDY_SETTINGS]),
    "generate": ("one reply from a finished run, with its route", cmd_generate, [
        RUN_DIR, *GENERATION, ("--prompt", {"required": True, "help": "the user message"}),
        ("--system", {"help": "an optional system message"}),
        ("--json", {"action": "store_true", "help": "print the reply, route and usage as JSON"})]),
    "chat": ("interactive chat with a finished run; prints each reply's route", cmd_chat, [
        RUN_DIR, *GENERATION,
        ("--route-every-turn", {"action": "store_true", "help": "route each turn, not once per conversation"})]),
    "serve": ("serve a finished run over an OpenAI-compatible HTTP API", cmd_serve, [
        RUN_DIR, ("--host", {"default": "127.0.0.1", "help": "address to bind (default: loopback only)"}),
        ("--port", {"type": int, "default": 8000}),
        ("--allowed-host", {"action": "append", "help": "a host name clients reach the server by, besides localhost "
                                                        "and the --host address (repeatable; '*': any)"}),
        ("--api-key", {"help": "require 'Authorization: Bearer KEY' (or set PRISM_API_KEY)"}),
        ("--max-batch", {"type": int, "help": "requests decoded together (default 16)"}),
        ("--max-queue", {"type": int, "help": "waiting requests before 503 answers (default 64)"}),
        ("--max-tokens-limit", {"type": int, "help": "largest max_tokens a request may ask (default 2048)"}),
        ("--context-length", {"type": int, "help": "prompt + max_tokens limit (default: the model's; on llamacpp at "
                                                   "most 4096, as every slot holds that much KV cache from the start)"}),
        ("--dtype", {"dest": "serve_dtype", "default": "auto", "choices": DTYPES,
                     "help": "the torch engine's weights (default auto: bfloat16 where the CPU or GPU has bf16 "
                             "units, else the run's)"}),
        "--engine", "--gguf", "--vllm-args",
        ("--upstream", {"help": "router mode: gate here, generate on this OpenAI-compatible server"}),
        ("--upstream-base", {"help": "the upstream's base model name (default: the adapter's parent)"}),
        ("--upstream-adapter", {"default": "prism-adapter", "help": "the upstream's name for the LoRA"}),
        ("--upstream-api-key", {"help": "key for the upstream (or set PRISM_UPSTREAM_API_KEY)"})]),
    "export-adapter": ("write the run's LoRA in a form vLLM and SGLang load", cmd_export_adapter, [
        RUN_DIR, ("--out", {"required": True, "help": "directory for the exported adapter (empty or new)"}),
        ("--force", {"action": "store_true", "help": "write into a non-empty --out (replaces only the adapter files)"}),
        ("--format", {"choices": ["peft", "gguf"], "default": "peft",
                      "help": "peft (vLLM, SGLang, PEFT) or gguf (llama.cpp LoRA files, one per adapter)"}), "--gguf"]),
}
QUIET_BY_DEFAULT = {"config", "personas", "generate", "chat", "export-adapter"}


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit code 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prism", description="PRISM: persona routing via intent-based self-modeling")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, fn, arguments) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
        for arg in arguments:
            if isinstance(arg, str):
                _add(p, [arg], study_models=name == "study")
            else:
                p.add_argument(arg[0], **arg[1])
        p.set_defaults(fn=fn, **({"quiet": True} if name in QUIET_BY_DEFAULT else {}))
    # Listed for --help only: main() hands `prism lm-eval ...` to lm-eval's own parser.
    sub.add_parser(LM_EVAL, add_help=False, help="lm-evaluation-harness with the `prism` model registered: "
                   "prism lm-eval run --model prism --model_args run=RUN_DIR --tasks ... (needs the lmeval extra)")
    return parser


def cmd_lm_eval(argv: list[str]) -> int:
    from prism.lmeval import main as lm_eval_main

    return lm_eval_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [LM_EVAL]:  # lm-eval's own arguments follow: its parser reads them, not ours
        try:
            return cmd_lm_eval(argv[1:])
        except PrismError as e:
            print(f"prism: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return args.fn(args)
    except (PrismError, ValueError, OSError) as e:  # the user's input or files: one line, no traceback
        if args.debug:
            traceback.print_exc()
        print("prism: error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line, always
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prism: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
