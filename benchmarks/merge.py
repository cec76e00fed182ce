"""Merge benchmark: `cogumi merge` vs PEFT `merge_and_unload` + `save_pretrained`, plus a plain copy of
the base's shards as the disk reference, on the same base and adapter, in one run.

Each variant runs in its own process, started fresh, and reports its own peak RSS (VmHWM); its wall time runs from process start to exit plus an ``os.sync()`` (all writes on disk), so
imports, reading, merging and writing all count, the same for every variant. Page caches are dropped
before each variant where the user may (root; the JSON says whether they were), then the Python
libraries are imported once, untimed: the model is read cold, the interpreter starts warm.

  --shape 8b     random-init Llama-3.1-8B-shaped bf16 base (vocab 128256, hidden 4096, 32 layers; 16 GB
                 in ~5 GB shards, written tensor group by tensor group with safetensors, never a whole
                 model in memory) and an r=64 adapter on the 7 projections (as ../shared/perf measured)
  --shape 1b     the same at Llama-3.2-1B size (2.5 GB), to rehearse on a small machine
  --smoke        cogumi's tiny offline model, seconds (CI)

Variants: copy (shutil.copytree), cogumi-nofid (`cogumi merge --no-fidelity`), cogumi-nofid-j1 (the same,
one shard at a time: COGUMI_MERGE_JOBS=1), cogumi (`cogumi merge`,
fidelity check on), peft-cpu (the seed's merge script, device_map=cpu), peft-gpu (device_map=auto; only
with --peft-gpu and a GPU). After each merge a few tensors are sampled and compared across variants: the
cogumi and PEFT outputs must agree (and differ from the base where the adapter applies).

  python benchmarks/merge.py --smoke
  python benchmarks/merge.py --shape 8b --out merge.json [--workdir /tmp/cogumi-merge-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                eos_token_id=128009,
                rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
LLAMA_1B = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8)
SHAPES = {"8b": LLAMA_8B, "1b": LLAMA_1B}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 5 * 10**9
GOAL_RSS_GIB = 2.0
GOAL_WALL_X_COPY = 1.2

# Every child prints its own peak RSS (VmHWM) last: ru_maxrss from wait4 would also count the parent's
# memory image the child inherited before exec.
HWM = "print('VMHWM_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
PEFT_CHILD = r'''
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, device_map = sys.argv[1:5]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device_map)
m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out)
if torch.cuda.is_available():
    torch.cuda.synchronize()
''' + HWM
COPY_CHILD = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2]); " + HWM
COGUMI_CHILD = "import sys; from cogumi.cli import main; rc = main(sys.argv[1:]); " + HWM + "; sys.exit(rc)"


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# inputs: a random-init base written shard by shard, and an adapter written as PEFT writes it
# ---------------------------------------------------------------------------------------------

def tensor_plan(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, from transformers' own model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def write_random_base(out: Path, shape: dict, *, seed: int = 0) -> Path:
    """A Llama-shaped bf16 checkpoint with random weights (the values do not matter for speed), written
    one ~5 GB shard at a time with safetensors, plus config.json and generation_config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape)
    config.dtype = torch.bfloat16
    plan = tensor_plan(config)
    g = torch.Generator().manual_seed(seed)
    # one random pool, sliced at shifting offsets: fast to make, and no two tensors identical
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)
    groups, size = [[]], 0
    for name, shp in plan:
        n = 1
        for d in shp:
            n *= d
        if groups[-1] and size + 2 * n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shp, n))
        size += 2 * n
    weight_map, total, offset = {}, 0, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shp, n in group:
            if name.endswith("norm.weight"):
                t = torch.ones(shp, dtype=torch.bfloat16)
            else:
                flat = torch.empty(n, dtype=torch.bfloat16)
                done = 0
                while done < n:
                    start = offset % pool.numel()
                    take = min(n - done, pool.numel() - start)
                    flat[done:done + take] = pool[start:start + take]
                    done += take
                    offset += take + 7919
                t = flat.view(shp)
            tensors[name] = t
            weight_map[name] = fname
            total += 2 * n
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=shape["bos_token_id"], eos_token_id=shape["eos_token_id"]).save_pretrained(out)
    return out


def write_adapter(out: Path, base: Path, *, r: int, alpha: int, seed: int = 1) -> Path:
    """An r-rank LoRA on the 7 projections, as PEFT saves it (config via peft.LoraConfig, tensors named
    base_model.model.<module>.lora_A/B.weight, fp32), with random non-zero B."""
    import math

    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(str(base))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shp in tensor_plan(config):
        module = name[: -len(".weight")]
        if module.split(".")[-1] in PROJECTIONS:
            out_f, in_f = shp
            bound = 1 / math.sqrt(in_f)
            tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.rand(r, in_f, generator=g) * 2 - 1) * bound
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=alpha, target_modules=PROJECTIONS, lora_dropout=0.0, task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------------------
# running one variant
# ---------------------------------------------------------------------------------------------

def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_libraries(env: dict | None) -> None:
    """Import the Python libraries once (untimed) after the caches are dropped: each variant then reads the
    model cold from disk but starts like any second command in a session, not from a cold disk."""
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, safetensors, cogumi.merge"],
                   env=env, capture_output=True)


def run_variant(name: str, cmd: list[str], *, timeout: float, log_dir: Path, env: dict | None = None) -> dict:
    """Wall (start to exit + sync) and peak RSS of one child process."""
    dropped = drop_caches()
    if dropped:
        warm_libraries(env)
    t0 = time.time()
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    os.sync()
    wall = time.time() - t0
    rc = os.waitstatus_to_exitcode(status)
    hwm = [line.split()[1] for line in log_path.read_text(errors="replace").splitlines() if line.startswith("VMHWM_KB")]
    peak_kb = int(hwm[-1]) if hwm else usage.ru_maxrss
    result = {"variant": name, "rc": rc, "wall_s": round(wall, 2), "peak_rss_gib": round(peak_kb / 2**20, 3),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "caches_dropped": dropped, "cmd": " ".join(cmd[:4]) + (" ..." if len(cmd) > 4 else "")}
    if rc != 0:
        result["log_tail"] = log_path.read_text(errors="replace")[-1500:]
    return result


def sample_tensors(model_dir: Path, names: list[str]) -> dict:
    import torch
    from safetensors import safe_open
    index = model_dir / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else {n: "model.safetensors" for n in names}
    out = {}
    for n in names:
        with safe_open(str(model_dir / files[n]), framework="pt") as f:
            out[n] = f.get_tensor(n).clone().to(torch.float32)
    return out


def compare_samples(a: dict, b: dict) -> dict:
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    differing = sum(int((a[n] != b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    return {"max_abs_diff": worst, "fraction_differing": differing}


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    ap.add_argument("--workdir", default=None, help="where base, adapter and outputs go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results JSON here too")
    ap.add_argument("--variants", default="copy,cogumi-nofid,cogumi,peft-cpu")
    ap.add_argument("--peft-gpu", action="store_true", help="also PEFT with device_map=auto (GPU)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per variant")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    a = ap.parse_args(argv)

    shape_name = "smoke" if a.smoke else a.shape
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="cogumi-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    results: dict = {"shape": shape_name, "rank": a.rank, "variants": [], "host": {"cpus": os.cpu_count()}}
    try:
        import torch
        results["host"]["torch_threads"] = torch.get_num_threads()
        t0 = time.time()
        if not (base / "config.json").exists():
            if a.smoke:
                from cogumi.tiny import build_tiny_base
                build_tiny_base(base, dtype="bfloat16", max_shard_size="100KB")
            else:
                write_random_base(base, SHAPES[a.shape])
        if not (adapter / "adapter_config.json").exists():
            write_adapter(adapter, base, r=8 if a.smoke else a.rank, alpha=16 if a.smoke else a.alpha)
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        results["base_bytes"] = base_bytes
        results["setup_s"] = round(time.time() - t0, 1)
        log(f"setup: base {base_bytes / 1e9:.2f} GB, adapter {sum(p.stat().st_size for p in adapter.iterdir()) / 1e6:.0f} MB "
            f"in {results['setup_s']}s ({work})")

        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] \
            if (base / "model.safetensors.index.json").exists() else None
        layers = max(int(n.split(".")[2]) for n in (index or {}) if n.startswith("model.layers.")) if index else 1
        probe = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers}.mlp.down_proj.weight",
                 f"model.layers.{layers}.input_layernorm.weight"]
        samples = {"base": sample_tensors(base, probe)}

        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        if a.peft_gpu:
            variants.append("peft-gpu")
        py = sys.executable
        env = dict(os.environ)
        src = Path(__file__).resolve().parents[1] / "src"
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(src)
        for v in variants:
            dst = work / f"out-{v}"
            shutil.rmtree(dst, ignore_errors=True)
            if v == "copy":
                cmd = [py, "-c", COPY_CHILD, str(base), str(dst)]
            elif v in ("cogumi", "cogumi-nofid", "cogumi-nofid-j1"):
                cmd = [py, "-c", COGUMI_CHILD, "merge", str(adapter), "--out", str(dst), "--base", str(base)]
                cmd += ["--no-fidelity"] if v.startswith("cogumi-nofid") else []
            elif v in ("peft-cpu", "peft-gpu"):
                cmd = [py, "-c", PEFT_CHILD, str(base), str(adapter), str(dst), "cpu" if v == "peft-cpu" else "auto"]
            else:
                raise SystemExit(f"unknown variant {v!r}")
            r = run_variant(v, cmd, timeout=a.timeout, log_dir=work,
                            env={**env, "COGUMI_MERGE_JOBS": "1"} if v.endswith("-j1") else env)
            if r["rc"] == 0 and v != "copy":
                samples[v] = sample_tensors(dst, probe)
            if r["rc"] == 0 and v.startswith("cogumi"):
                man = json.loads((dst / "cogumi.json").read_text())
                keep = ("passed", "max_abs_logit_diff", "top1_agreement", "top1_agreement_confident",
                        "confident_positions", "kl_mean", "lora_effect", "wall_s", "skipped")
                r["fidelity"] = {k: man["fidelity"][k] for k in keep if k in man["fidelity"]}
                r["merge_wall_s_inside"] = man.get("merge_wall_s")
                r["timings_s"] = man.get("timings_s")
                r["in_process_s"] = man.get("wall_s")
                r["merge_jobs"] = man["output"].get("merge_jobs")
            shutil.rmtree(dst, ignore_errors=True)
            results["variants"].append(r)
            log(f"variant {v}: rc={r['rc']} wall {r['wall_s']:.1f}s peak RSS {r['peak_rss_gib']:.2f} GiB"
                + (f"\n{r.get('log_tail', '')}" if r["rc"] else ""))
            if a.out:
                Path(a.out).write_text(json.dumps(results, indent=1))

        checks = {}
        merged_names = [n for n in samples if n != "base"]
        for n in merged_names:
            checks[f"{n}_vs_base"] = compare_samples(samples[n], samples["base"])
        for n in merged_names:
            if n != "peft-cpu" and "peft-cpu" in samples:
                checks[f"{n}_vs_peft-cpu"] = compare_samples(samples[n], samples["peft-cpu"])
        results["checks"] = checks
        by = {r["variant"]: r for r in results["variants"]}
        copy_wall = by.get("copy", {}).get("wall_s")
        for r in results["variants"]:
            if copy_wall and r["rc"] == 0:
                r["wall_x_copy"] = round(r["wall_s"] / copy_wall, 3)
        ok = []
        for v in ("cogumi-nofid", "cogumi-nofid-j1", "cogumi"):
            if v in by and by[v]["rc"] == 0:
                agree = checks.get(f"{v}_vs_peft-cpu", {}).get("max_abs_diff")
                ok.append({"variant": v, "rss_goal_met": by[v]["peak_rss_gib"] <= GOAL_RSS_GIB,
                           "wall_goal_met": bool(copy_wall) and by[v]["wall_s"] <= GOAL_WALL_X_COPY * copy_wall,
                           "agrees_with_peft": None if agree is None else agree <= 2 * 2 ** -7 *
                           max(1.0, float(samples[v][probe[1]].abs().max()))})
        results["goals"] = ok

        log("")
        log("| variant | wall s | x copy | peak RSS GiB | CPU s | notes |")
        log("|---|---|---|---|---|---|")
        for r in results["variants"]:
            note = ""
            if "fidelity" in r and not r["fidelity"].get("skipped"):
                f = r["fidelity"]
                note = (f"fidelity {'ok' if f.get('passed') else 'FAILED'} ({f.get('wall_s')}s; KL {f.get('kl_mean'):.2g} "
                        f"vs LoRA effect {f.get('lora_effect', {}).get('kl_mean', float('nan')):.2g}, "
                        f"top-1 {f.get('top1_agreement'):.3f})")
            if r.get("timings_s"):
                stages = ", ".join(f"{k} {v}s" for k, v in r["timings_s"].items() if not isinstance(v, dict))
                note = (f"{r.get('merge_jobs')} shard(s) at once, in-process {r['in_process_s']}s: {stages}"
                        + ("; " + note if note else ""))
            if r["rc"]:
                note = f"FAILED rc={r['rc']}"
            log(f"| {r['variant']} | {r['wall_s']:.1f} | {r.get('wall_x_copy', '-')} | {r['peak_rss_gib']:.2f} | "
                f"{r['cpu_s']} | {note} |")
        for k, v in checks.items():
            log(f"check {k}: max |diff| {v['max_abs_diff']:.3g}, {v['fraction_differing']:.2%} of sampled elements differ")
        for g in ok:
            log(f"goal {g['variant']}: RSS <= {GOAL_RSS_GIB} GiB: {g['rss_goal_met']}; wall <= {GOAL_WALL_X_COPY} x copy: "
                f"{g['wall_goal_met']}; agrees with PEFT: {g['agrees_with_peft']}")
        log("merge-json " + json.dumps(results))
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1))
        failed = [r for r in results["variants"] if r["rc"] != 0]
        return 1 if failed else 0
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
