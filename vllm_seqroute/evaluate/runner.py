"""One (model, policy) measurement through vLLM, in its own process.

A fresh process per configuration keeps the peak RSS meaningful and the engines independent;
``vanilla`` runs with ``VLLM_PLUGINS=""`` so the plugin is not even loaded. The parent passes
the token windows in a JSON file, so every configuration scores identical tokens.

    python -m vllm_seqroute.evaluate.runner JOB.json RESULT.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_seqroute.options import FIELDS
from vllm_seqroute.policies import registry
from vllm_seqroute.vllm_glue import stages

SPEC_KEYS = {k.removeprefix("routing_"): k for k in FIELDS if k != "routing"} | {
    p.field: p.key for p in registry.options().values() if not p.per_request}


@dataclass
class Spec:
    """A routing choice as written on the command line: ``vanilla`` (vLLM without the plugin),
    ``topk:2``, ``seqtopk:2``, ``topp:0.4``, ``entropy`` / ``entropy:2`` (budget: k_max = 2*B),
    extra options after commas: ``seqtopk:2,cap=4,rule=window``."""

    text: str
    options: dict[str, Any] | None = None  # additional_config["seqroute"]; None: vanilla
    label: str = ""

    @staticmethod
    def parse(text: str) -> Spec:
        from vllm_seqroute.options import coerce

        head, *extras = text.split(",")
        name, _, num = head.partition(":")
        name = name.strip().lower()
        if name in ("vanilla", "none", "plain"):
            if num or extras:
                raise ValueError(f"{text!r}: vanilla takes no options")
            return Spec(text, None, "vanilla")
        opts: dict[str, Any] = {"routing": coerce("routing", name)}
        if num:  # the policy's dial: topp's p, seqtopk's (real) budget, topk's integer budget...
            key = f"routing_{registry.spec(opts['routing']).dial}"
            try:
                opts[key] = coerce(key, FIELDS[key][1](num))
            except ValueError:
                raise ValueError(f"{text!r}: {num!r} is not a valid {key}") from None
        for ex in extras:
            k, eq, v = ex.partition("=")
            if not eq or k.strip() not in SPEC_KEYS:
                raise ValueError(f"{text!r}: unknown option {ex!r}; known: {sorted(SPEC_KEYS)}")
            key = SPEC_KEYS[k.strip()]
            v = v.strip()
            if key == "routing_pool":
                opts[key] = v
                continue
            typ = FIELDS[key][1]
            opts[key] = coerce(key, typ(v))
        label = name
        if "routing_budget" in opts:
            label += f"@{opts['routing_budget']}"
        dial = f"routing_{registry.spec(name).dial}"
        if dial != "routing_budget" and dial in opts:
            label += f"@{dial.removeprefix('routing_')[:1]}{opts[dial]:g}"
        for k, v in opts.items():
            if k not in ("routing", "routing_budget", dial):
                label += f",{k.removeprefix('routing_')}={v}"
        return Spec(text, opts, label)


@dataclass
class Job:
    model: str
    spec: Spec
    windows_file: str
    dtype: str = "auto"
    enforce_eager: bool = True
    decode_batch: int = 8
    decode_prompt: int = 64
    decode_tokens: int = 64
    speed: bool = True  # measure prefill/decode throughput (False: loss and counters only)
    records_file: str = ""  # per-token routing records of the loss pass go here ("": none)
    gen_tokens: int = 0  # recorded generation (experts vs position): tokens per request (0: none)
    extra: dict[str, Any] = field(default_factory=dict)


# --- inside the worker process -----------------------------------------------------------
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_job(job: Job) -> dict[str, Any]:

    from vllm_seqroute.evaluate.heldout import close_llm, make_llm, nll_vllm, prompt_nll

    windows = json.loads(Path(job.windows_file).read_text())
    longest = max(len(w) for w in windows)
    t0 = time.perf_counter()
    # prefix caching off for every configuration: the timings repeat prompts, and seqtopk turns
    # caching off by itself, so cache hits would flatter the other policies
    kw = {"enable_prefix_caching": False, **job.extra}
    llm = make_llm(job.model, job.spec.options, dtype=job.dtype, enforce_eager=job.enforce_eager,
                   max_model_len=max(longest, job.decode_prompt + max(job.decode_tokens, job.gen_tokens)) + 8,
                   **kw)
    startup = time.perf_counter() - t0
    routed = job.spec.options is not None

    def stats(reset: bool) -> dict[str, Any] | None:
        if not routed:
            return None
        return stages.merge_stats(llm.collective_rpc("seqroute_stats",
                                                     kwargs={"reset": reset, "requests": False}))

    def record(on: bool, max_tokens: int = 0) -> dict[str, Any] | None:
        return stages.merge_records(llm.collective_rpc("seqroute_record",
                                                       kwargs={"on": on, "max_tokens": max_tokens}))

    recording = routed and bool(job.records_file)
    started: dict[str, Any] | None = None
    nll_vllm(llm, windows[:2])  # warm-up (first-call costs), then counters from zero
    stats(True)
    if recording:
        started = record(True, sum(len(w) for w in windows))
        recording = bool(started and started["recording"])
    t = time.perf_counter()
    req_ids, nll = prompt_nll(llm, windows)
    t_loss = time.perf_counter() - t
    recs = record(False) if recording else None
    st = stats(True)
    total, count = sum(sum(x) for x in nll), sum(len(x) for x in nll)

    out: dict[str, Any] = {
        "loss_nll_sum": total, "loss_tokens": count, "loss": total / count, "windows": len(windows),
        "stats": st, "startup_s": round(startup, 2), "loss_pass_s": round(t_loss, 3),
        "decode_batch": job.decode_batch}
    if routed and job.records_file and not recording:
        out["records_note"] = started.get("reason") if started else "no routed MoE layer"
    if recs is not None:
        out.update(_save_records(job.records_file, req_ids, nll, recs))
    if recording and job.gen_tokens > 0:
        out.update(_recorded_generation(llm, windows, job, record))
        stats(True)
    if job.speed:
        out.update(_speed(llm, windows, job))
    stats(True)
    close_llm(llm)
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _save_records(path: str, req_ids: list[str], nll: list[list[float]], recs: dict[str, Any]
                  ) -> dict[str, Any]:
    """The loss pass's records joined with its per-token losses, as ``path`` (.npz)."""
    import numpy as np

    from vllm_seqroute.evaluate.difficulty import join_windows

    joined: dict[str, Any] = join_windows(req_ids, nll, recs)
    np.savez_compressed(path, **joined)
    return {"records_file": path, "records_tokens": int(joined["experts"].shape[0]),
            "records_dropped": recs["dropped"]}


def _recorded_generation(llm: Any, windows: list[list[int]], job: Job, record: Any) -> dict[str, Any]:
    """``decode_batch`` requests: a window's first ``decode_prompt`` tokens, then ``gen_tokens``
    greedy tokens, recorded (experts per token against position)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    plen = min(job.decode_prompt, min(len(w) for w in windows))
    prompts = [TokensPrompt(prompt_token_ids=list(windows[i % len(windows)][:plen]))
               for i in range(job.decode_batch)]
    record(True, job.decode_batch * (plen + job.gen_tokens))
    llm.generate(prompts, SamplingParams(max_tokens=job.gen_tokens, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    return {"gen_records": record(False), "gen_prompt_len": plen, "gen_tokens": job.gen_tokens}


def _best_time(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _speed(llm: Any, windows: list[list[int]], job: Job, repeats: int = 2) -> dict[str, float | None]:
    """Prefill: all windows, one output token each. Decode: ``decode_batch`` requests of
    ``decode_prompt`` tokens generating ``decode_tokens`` more, minus the same requests'
    prefill. Best of ``repeats`` runs each; decode None where the timings cannot tell it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=list(w)) for w in windows]
    t_prefill = _best_time(lambda: llm.generate(prompts, greedy, use_tqdm=False), repeats)
    dp = [TokensPrompt(prompt_token_ids=list(windows[i % len(windows)][: job.decode_prompt]))
          for i in range(job.decode_batch)]
    gen = SamplingParams(max_tokens=job.decode_tokens + 1, temperature=0.0, ignore_eos=True)
    t_short = _best_time(lambda: llm.generate(dp, greedy, use_tqdm=False), repeats)
    t_gen = _best_time(lambda: llm.generate(dp, gen, use_tqdm=False), repeats)
    out: dict[str, float | None] = {"prefill_tok_s": sum(len(w) for w in windows) / t_prefill,
                                    "prefill_s": t_prefill, "decode_tok_s": None, "decode_ms_per_step": None}
    decode_time = t_gen - t_short
    # decode_tokens more steps than the short run, each at least a read of the active weights: a
    # difference under a tenth of the whole generation means another process stretched the short
    # run (seen on a loaded machine: 5e11 tok/s from a difference clipped at 1 ns); say n/a
    if decode_time > 0.1 * t_gen:
        out["decode_tok_s"] = job.decode_batch * job.decode_tokens / decode_time
        out["decode_ms_per_step"] = 1000 * decode_time / job.decode_tokens
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    raw = json.loads(Path(argv[0]).read_text())
    raw["spec"] = Spec(**raw["spec"])
    out = run_job(Job(**raw))
    Path(argv[1]).write_text(json.dumps(out))
    return 0


# --- in the parent -----------------------------------------------------------------------
def run_in_subprocess(job: Job, workdir: Path, name: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process; its log goes to ``workdir/NAME.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, res_file, log_file = (workdir / f"{name}.{s}" for s in ("job.json", "result.json", "log"))
    job_file.write_text(json.dumps(asdict(job)))
    res_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in the worker: one RSS
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if job.spec.options is None:
        env["VLLM_PLUGINS"] = ""  # vanilla: no plugin loaded at all
    with log_file.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "vllm_seqroute.evaluate.runner", str(job_file),
                               str(res_file)], stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, check=False)
    if proc.returncode != 0 or not res_file.exists():
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{name}: vLLM worker failed (exit {proc.returncode}); log {log_file}:\n"
                           + "\n".join(tail))
    return json.loads(res_file.read_text())


if __name__ == "__main__":
    sys.exit(main())
