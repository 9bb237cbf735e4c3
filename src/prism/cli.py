"""The `prism` command. Each subcommand imports its code only when it runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from prism.config import PRESETS, STAGES

EXIT_USAGE = 2


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="'embedded' (default), a local model directory or a hub id")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named settings (default: quick)")
    p.add_argument("--config", help="YAML file of settings; overrides the preset")
    p.add_argument("--personas", help="extra personas: a directory of YAML files or one YAML file")
    p.add_argument("--only", help="comma-separated persona names to use (default: all)")
    p.add_argument("--length", choices=["long", "short", "minimal"], help="persona length")
    p.add_argument("--placement", choices=["system", "user"], help="where the persona goes")
    p.add_argument("--n", type=int, dest="n_per_persona", help="queries per persona")
    p.add_argument("--judge", choices=["prompted", "likelihood", "generate", "program"], help="judge kind")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--infer-dtype", choices=["model", "float32", "bfloat16", "float16"],
                   help="cast the weights to this dtype for stages 1-3 and the teacher logits (bfloat16: 1.8x "
                        "faster generation on CPUs with AVX512-BF16); training keeps --dtype")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow model repositories to run their own code (off by default)")
    p.add_argument("--generator-url", help="generate stages 1-3 on this OpenAI-compatible server (vLLM, SGLang, "
                                           "prism serve); key in PRISM_GENERATOR_API_KEY")
    p.add_argument("--generator-model", help="the model's name on that server (default: its first model)")
    p.add_argument("--generator-concurrency", type=int, help="requests in flight to that server (default 16)")


def _resolve_config(args):
    from prism.config import load_config

    overrides = {
        "model": args.model,
        "persona_dir": args.personas,
        "personas": [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None,
        "persona_length": args.length,
        "placement": args.placement,
        "queries.n_per_persona": args.n_per_persona,
        "judge.kind": args.judge,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "infer_dtype": getattr(args, "infer_dtype", None),
        "device": args.device,
        "trust_remote_code": args.trust_remote_code,
        "generator_url": args.generator_url,
        "generator_model": args.generator_model,
        "generator_concurrency": args.generator_concurrency,
    }
    return load_config(args.preset, args.config, overrides)


def cmd_run(args) -> int:
    from prism.pipeline import run_pipeline

    config = _resolve_config(args)
    run = run_pipeline(config, args.out, until=args.until, quiet=args.quiet)
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


def cmd_personas(args) -> int:
    from prism.personas import PersonaRegistry

    reg = PersonaRegistry.load(args.personas)
    if args.show:
        p = reg.get(args.show)
        print(json.dumps({"name": p.name, "kind": p.kind, "category": p.category, "source": p.source,
                          "texts": p.texts}, indent=2))
        return 0
    for p in reg.personas.values():
        lengths = ",".join(p.texts)
        print(f"{p.name:<16} {p.kind:<10} {p.category or '-':<12} {lengths:<20} {p.description}")
    return 0


def cmd_config(args) -> int:
    import yaml

    print(yaml.safe_dump(_resolve_config(args).to_dict(), sort_keys=False), end="")
    return 0


def _load_routed(args):
    from prism.routed import PrismModel

    return PrismModel.load(args.run_dir, route_every_turn=getattr(args, "route_every_turn", False))


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--adapter", choices=["auto", "on", "off"], default="auto", help="force the route")


def _forced(args) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.adapter]


def cmd_generate(args) -> int:
    model = _load_routed(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    reply = model.chat(messages, args.max_new_tokens, args.temperature, args.top_p, args.seed, _forced(args))
    if args.json:
        print(json.dumps(reply.to_dict(), ensure_ascii=False))
    else:
        print(reply.text)
        print(_route_line(reply.route), file=sys.stderr)
    return 0


def _route_line(route) -> str:
    state = "ON" if route.adapter else "off"
    how = "forced" if route.forced else f"gate {route.score:.3f} vs threshold {route.threshold:.3f}"
    return f"[route: adapter {state}, {how}]"


def cmd_chat(args) -> int:
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
        reply = model.chat(messages, args.max_new_tokens, args.temperature, args.top_p, args.seed, _forced(args))
        messages.append({"role": "assistant", "content": reply.text})
        print(f"prism> {reply.text}\n{_route_line(reply.route)}", flush=True)


def _parse_limits(text: str | None) -> dict[str, int]:
    limits = {}
    for part in (text or "").split(","):
        if part.strip():
            name, _, value = part.partition("=")
            if not value.strip().isdigit():
                raise ValueError(f"--limit takes name=N pairs (e.g. mmlu=100,mtbench=16), got {part!r}")
            limits[name.strip()] = int(value)
    return limits


def cmd_eval(args) -> int:
    from prism.eval import run_eval

    limits = _parse_limits(args.limit)
    persona_map = dict(p.split("=", 1) for p in (args.persona_map or "").split(",") if "=" in p)
    results = run_eval(
        args.out, run_dir=args.run_dir, model=args.model, preset=args.preset, quiet=args.quiet,
        data_dir=args.data, limits=limits or None,
        systems=tuple(args.systems.split(",")) if args.systems else None,
        benchmarks=tuple(args.benchmarks.split(",")) if args.benchmarks else None,
        mmlu_shots=args.shots, judge=args.judge, judge_url=args.judge_url, judge_model=args.judge_model,
        judge_key_env=args.judge_key_env, refusal=args.refusal, persona_map=persona_map or None,
    )
    from pathlib import Path

    print((Path(args.out) / "table.md").read_text())
    print(f"results: {Path(args.out) / 'results.json'}; plots: {', '.join(results.get('plots', []))}")
    return 0


def cmd_study(args) -> int:
    from pathlib import Path

    from prism.study import run_study

    limits = _parse_limits(args.limit)
    overrides = {"personas": args.personas.split(",") if args.personas else None,
                 "lengths": args.lengths.split(",") if args.lengths else None,
                 "placements": args.placements.split(",") if args.placements else None,
                 "benchmarks": args.benchmarks.split(",") if args.benchmarks else None,
                 "limits": limits or None, "persona_dir": args.persona_dir, "judge": args.judge,
                 "judge_url": args.judge_url, "judge_model": args.judge_model, "refusal": args.refusal,
                 "cross": args.cross, "dtype": args.dtype}
    results = run_study(args.out, models=args.model or None, preset=args.preset, config_file=args.config,
                        overrides=overrides, data_dir=args.data, quiet=args.quiet)
    out = Path(args.out)
    print((out / "findings.md").read_text())
    print(f"report: {out / 'report.html'}; results: {out / 'results.json'}; figures: {out / 'figures'}; "
          f"{results['seconds']:.0f}s")
    return 0


def cmd_serve(args) -> int:
    from prism.serve.runner import serve

    serve(args.run_dir, args.host, args.port, args.api_key, upstream=args.upstream, upstream_base=args.upstream_base,
          upstream_adapter=args.upstream_adapter, upstream_api_key=args.upstream_api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
          context_length=args.context_length)
    return 0


def cmd_export_adapter(args) -> int:
    from prism.serve.export import export_adapter

    info = export_adapter(args.run_dir, args.out)
    print(json.dumps(info, indent=2))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM: persona routing via intent-based self-modeling")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline (resumes a run in --out)")
    _config_args(p)
    p.add_argument("--until", choices=STAGES, help="stop after this stage (default: all)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("config", help="print the resolved config as YAML")
    _config_args(p)
    p.set_defaults(fn=cmd_config, quiet=True)

    p = sub.add_parser("personas", help="list the persona registry")
    p.add_argument("--personas", help="extra personas: a directory or YAML file")
    p.add_argument("--show", help="print one persona's texts")
    p.set_defaults(fn=cmd_personas, quiet=True)

    p = sub.add_parser("eval", help="base / expert prompting / ungated / PRISM on MT-Bench, MMLU, safety, XSTest")
    p.add_argument("run_dir", nargs="?", help="a finished run directory (all four systems)")
    p.add_argument("--model", help="evaluate a model without a run: base and persona rows only")
    p.add_argument("--out", required=True, help="results directory (resumable)")
    p.add_argument("--preset", default="quick", choices=["quick", "full"])
    p.add_argument("--data", help="benchmark data folder (default: ../shared/benchmarks or $PRISM_BENCHMARKS)")
    p.add_argument("--limit", help="per-benchmark item limits, e.g. mmlu=200,mtbench=80,harmbench=100")
    p.add_argument("--systems", help="comma-separated subset of base,persona,ungated,prism")
    p.add_argument("--benchmarks", help="comma-separated subset of mtbench,mmlu,safety,xstest")
    p.add_argument("--shots", type=int, default=0, help="MMLU few-shot examples from the dev file")
    p.add_argument("--judge", default="self", help="MT-Bench judge: self, or a local model directory / hub id")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for the MT-Bench judge")
    p.add_argument("--judge-model", help="model name at --judge-url")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--refusal", default="pattern", choices=["pattern", "judge"], help="refusal classifier")
    p.add_argument("--persona-map", help="category=persona overrides, e.g. other=critic,pku=helpful")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("study", help="the persona-effect study: persona x length x placement x task, with CIs")
    p.add_argument("--model", action="append", help="model to study (repeat for several; default: the embedded one)")
    p.add_argument("--out", required=True, help="results directory (resumable; a re-run reuses every cached row)")
    p.add_argument("--preset", default="quick", choices=["quick", "full", "micro"])
    p.add_argument("--config", help="YAML file of study settings (see prism.study.grid.StudyConfig)")
    p.add_argument("--data", help="benchmark data folder (default: ../shared/benchmarks or $PRISM_BENCHMARKS)")
    p.add_argument("--personas", help="comma-separated personas (default: all in the registry)")
    p.add_argument("--persona-dir", help="extra personas: a directory or YAML file")
    p.add_argument("--lengths", help="comma-separated subset of long,short,minimal")
    p.add_argument("--placements", help="comma-separated subset of system,user")
    p.add_argument("--cross", choices=["reference", "full"],
                   help="reference: every persona at the reference length/placement only; full: everywhere")
    p.add_argument("--benchmarks", help="comma-separated subset of mtbench,mmlu,safety")
    p.add_argument("--limit", help="per-set item limits, e.g. mmlu=200,mtbench=80,harmbench=50")
    p.add_argument("--judge", help="MT-Bench judge: self, or a local model directory / hub id")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for the MT-Bench judge")
    p.add_argument("--judge-model", help="model name at --judge-url")
    p.add_argument("--refusal", choices=["pattern", "judge"], help="refusal classifier")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default float32; bfloat16 is faster on CPUs with bf16 units)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("generate", help="one reply from a finished run, with its route")
    _gen_args(p)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", help="an optional system message")
    p.add_argument("--json", action="store_true", help="print the reply, route and usage as JSON")
    p.set_defaults(fn=cmd_generate, quiet=True)

    p = sub.add_parser("chat", help="interactive chat with a finished run; prints each reply's route")
    _gen_args(p)
    p.add_argument("--route-every-turn", action="store_true", help="route each turn, not once per conversation")
    p.set_defaults(fn=cmd_chat, quiet=True)

    p = sub.add_parser("serve", help="serve a finished run over an OpenAI-compatible HTTP API")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set PRISM_API_KEY)")
    p.add_argument("--max-batch", type=int, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 503 answers (default 64)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask (default 2048)")
    p.add_argument("--context-length", type=int, help="prompt + max_tokens limit (default: the model's)")
    p.add_argument("--upstream", help="router mode: gate here, generate on this OpenAI-compatible server "
                                      "(vLLM with --enable-lora)")
    p.add_argument("--upstream-base", help="the upstream's base model name (default: the adapter's parent)")
    p.add_argument("--upstream-adapter", default="prism-adapter", help="the upstream's name for the LoRA")
    p.add_argument("--upstream-api-key", help="key for the upstream (or set PRISM_UPSTREAM_API_KEY)")
    p.set_defaults(fn=cmd_serve, quiet=False)

    p = sub.add_parser("export-adapter", help="write the run's LoRA in a form vLLM and SGLang load")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--out", required=True, help="directory for the exported adapter")
    p.set_defaults(fn=cmd_export_adapter, quiet=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prism.config import ConfigError
    from prism.models import ModelLoadError
    from prism.personas import PersonaError
    from prism.run import RunError
    from prism.serve.openai_backend import GeneratorError

    args = _build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return args.fn(args)
    except (ConfigError, ModelLoadError, PersonaError, RunError, GeneratorError, ValueError) as e:
        print(f"prism: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prism: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
