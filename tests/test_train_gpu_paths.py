"""Issue 18 §4: what a GPU run needs, checked on the CPU (tiny_bl, tiny_vit, 64 px).

* the prompt encoder and dense PE run in fp32 under autocast, and training, validation and
  evaluation give the mask decoder the same inputs (one function: ``prompt_inputs``);
* the point embedding is SAM's without boolean-mask writes (no host sync), and the teacher
  splits a partly cached batch with index tensors;
* the compiled teacher does not recompile per batch size;
* forward passes on fake CUDA tensors create nothing on the CPU;
* rank 0's slow checkpoint write does not time out the other ranks' collectives (slow).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blsam import blsam_model_registry
from blsam.modeling.prompt_inputs import embed_points, prompt_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = 64
LOW = IMG // 4


@pytest.fixture(scope="module")
def sam(tiny_sam_ckpt):
    torch.manual_seed(0)
    return blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=IMG).eval()


class SyncFlags(TorchDispatchMode):
    """Records ops that need the host to read device data: ``nonzero`` (boolean indexing),
    ``_local_scalar_dense`` (``.item()``, ``.tolist()``, ``bool(t)``), ``index_put`` or
    ``index`` with a boolean mask."""

    SYNC = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select",
            "aten::nonzero_static"}

    def __init__(self) -> None:
        super().__init__()
        self.flagged = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self.SYNC:
            self.flagged.append(name)
        if name.startswith("aten::index"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
                self.flagged.append(name + "(bool)")
        return func(*args, **kwargs)


def _prompts(g, n, p, with_pad):
    pts = torch.rand(n, p, 2, generator=g) * IMG
    lab = torch.randint(0, 2, (n, p), generator=g)
    if with_pad:
        lab[torch.rand(n, p, generator=g) < 0.3] = -1
    return pts, lab


# ---------------------------------------------------------------- sync-free point embedding


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("with_pad_labels", [True, False])
def test_embed_points_equals_sam_without_a_sync(sam, pad, with_pad_labels):
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(int(pad) * 2 + int(with_pad_labels))
    pts, lab = _prompts(g, 7, 3, with_pad_labels)
    with torch.no_grad():
        want = pe._embed_points(pts, lab, pad=pad)
        with SyncFlags() as flags:
            got = embed_points(pe, pts, lab, pad=pad)
    assert flags.flagged == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == (7, 3 + int(pad), pe.embed_dim)


def test_sync_flags_catch_sams_own_point_embedding(sam):
    """The detector works: SAM's boolean-mask writes are flagged."""
    pts, lab = _prompts(torch.Generator().manual_seed(0), 3, 2, True)
    with torch.no_grad(), SyncFlags() as flags:
        sam.prompt_encoder._embed_points(pts, lab, pad=True)
    assert any("nonzero" in f or "bool" in f for f in flags.flagged)


@pytest.mark.parametrize("form", ["points", "points+box", "box", "box+mask", "points+mask"])
def test_prompt_inputs_equal_sams_prompt_encoder(sam, form):
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(1)
    pts = (_prompts(g, 4, 2, True) if "points" in form else None)
    boxes = torch.rand(4, 4, generator=g) * IMG if "box" in form else None
    masks = torch.randn(4, 1, LOW, LOW, generator=g) if "mask" in form else None
    with torch.no_grad():
        sparse0, dense0 = pe(points=pts, boxes=boxes, masks=masks)
        with SyncFlags() as flags:
            sparse, dense, image_pe = prompt_inputs(pe, pts, boxes, masks)
    assert flags.flagged == []
    torch.testing.assert_close(sparse, sparse0, rtol=0, atol=0)
    torch.testing.assert_close(dense, dense0, rtol=0, atol=0)
    torch.testing.assert_close(image_pe, pe.get_dense_pe(), rtol=0, atol=0)


# ---------------------------------------------------------------- fp32 prompt inputs under autocast


def _capture_training_inputs(sam, monkeypatch, batch):
    """The (image_pe, sparse, dense) training hands the batched decoder, under bf16 autocast."""
    import blsam.train.distill as model_mod

    seen = []
    decode = model_mod.decode_masks

    def spy(decoder, emb, index, image_pe, sparse, dense, multimask):
        seen.append((image_pe, sparse, dense))
        return decode(decoder, emb, index, image_pe, sparse, dense, multimask)

    monkeypatch.setattr(model_mod, "decode_masks", spy)
    model = model_mod.DistillModel(sam, lambda_fd=1.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch["image"], batch, batch["teacher"])
    return seen


def _capture_decoder_inputs(decoder):
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["image_pe"], kwargs["sparse_prompt_embeddings"],
                     kwargs["dense_prompt_embeddings"]))
    return seen, decoder.register_forward_pre_hook(hook, with_kwargs=True)


def test_training_validation_and_evaluation_decode_the_same_fp32_inputs(sam, monkeypatch):
    """Under CPU bf16 autocast, training's decoder inputs (sparse and dense prompt embeddings,
    dense PE) equal validation's and evaluation's, and all are fp32 and equal to the prompt
    encoder's fp32 outputs outside autocast (bf16 would be off by up to ~0.1)."""
    from blsam.evaluation.runner import Evaluator, Predictor
    from blsam.train.validation import decode

    g = torch.Generator().manual_seed(3)
    pts = torch.randint(0, IMG, (2, 1, 2), generator=g).float()
    lab = torch.ones(2, 1, dtype=torch.long)
    box = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 3.0, 60.0, 30.0]])
    batch = {"kind": ["point", "box"], "masks": [torch.zeros(2, LOW, LOW)] * 2,
             "boxes": [None, box], "points": [pts, None], "labels": [lab, None],
             "seed": [1, 2], "hw": [(IMG, IMG)] * 2,
             "image": torch.randn(2, 3, IMG, IMG, generator=g),
             "teacher": torch.randn(2, 256, IMG // 16, IMG // 16, generator=g)}
    emb = torch.randn(1, 256, IMG // 16, IMG // 16, generator=g)
    seen, handle = _capture_decoder_inputs(sam.mask_decoder)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            decode(sam.prompt_encoder, sam.mask_decoder, emb, pts, lab, None)  # validation
            decode(sam.prompt_encoder, sam.mask_decoder, emb, None, None, box)
            predictor = Predictor(sam)  # evaluation (eval/zero_shot.py): Evaluator._decode
            predictor.set_torch_image(torch.zeros(1, 3, IMG, IMG), (IMG, IMG))
            ev = Evaluator.__new__(Evaluator)
            ev.predictor, ev.device = predictor, torch.device("cpu")
            ev._decode(pts.numpy(), lab.numpy(), None, True)
            ev._decode(None, None, box.numpy(), False)
    finally:
        handle.remove()
    val, evl = seen[:2], seen[2:]
    with torch.no_grad():
        ref_pe = sam.prompt_encoder.get_dense_pe()
        ref_pt = sam.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
        ref_box = sam.prompt_encoder(points=None, boxes=box, masks=None)
    for (pe_, sparse, dense), (s0, d0) in zip(val, (ref_pt, ref_box)):
        for t, r in ((pe_, ref_pe), (sparse, s0), (dense, d0)):
            assert t.dtype == torch.float32
            torch.testing.assert_close(t, r, rtol=0, atol=0)
    for a, b in zip(val, evl):
        for t, r in zip(a, b):
            torch.testing.assert_close(t, r, rtol=0, atol=0)
    # training: the point group (1 click + SAM's pad point) and the box group (2 corners)
    seen_train = _capture_training_inputs(sam, monkeypatch, batch)
    assert len(seen_train) == 2  # one call per prompt form: the clicks' image, the box's
    for (pe_, sparse, dense), (s0, d0) in zip(seen_train, (ref_pt, ref_box)):
        for t, r in ((pe_, ref_pe), (sparse, s0), (dense, d0)):
            assert t.dtype == torch.float32
            torch.testing.assert_close(t, r, rtol=0, atol=0)
    # and bf16 would have mattered: SAM's prompt encoder under autocast is not fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf = sam.prompt_encoder.get_dense_pe()
    assert bf.dtype == torch.bfloat16 and (bf.float() - ref_pe).abs().max() > 1e-3


# ---------------------------------------------------------------- teacher batches


def test_teacher_merges_a_partly_cached_batch_with_index_tensors(tiny_sam_ckpt):
    from blsam.train.teacher import Teacher

    t = Teacher("tiny_vit", tiny_sam_ckpt, IMG, torch.device("cpu"))
    x = torch.randn(4, 3, IMG, IMG)
    full = t.encode(x)
    cached = [None, full[1].half(), None, full[3].half()]
    with SyncFlags() as flags:
        out = t.embeddings(x, cached)
    assert not [f for f in flags.flagged if "bool" in f or "nonzero" in f]
    torch.testing.assert_close(out[0::2], full[0::2], rtol=0, atol=0)
    torch.testing.assert_close(out[1::2], full[1::2].half().float(), rtol=0, atol=0)
    torch.testing.assert_close(t.embeddings(x, [None] * 4), full, rtol=0, atol=0)


# ---------------------------------------------------------------- compiled teacher


def test_window_rows_compile_once_for_every_batch_size():
    """``window_rows`` used to pad with the batch-dependent row count (``F.pad(value=n)``): a
    compiled graph guarded on the batch size. Now batch 1 and one dynamic graph."""
    from torch._dynamo.testing import CompileCounter

    from blsam.modeling.attention import window_rows

    torch._dynamo.reset()
    cnt = CompileCounter()
    f = torch.compile(lambda x: x.index_select(0, window_rows(x.shape[0] // 25, 5, 5, 4,
                                                               x.device)), backend=cnt)
    for b in range(1, 6):
        x = torch.arange(b * 25 + 1).float()[:, None]
        assert torch.equal(f(x), x.index_select(0, window_rows(b, 5, 5, 4, x.device)))
    assert cnt.frame_count <= 2


@pytest.mark.slow
def test_compiled_teacher_does_not_recompile_per_batch_size(tiny_sam_ckpt):
    """The tiny_vit teacher's fused encoder, compiled as ``Teacher`` compiles it, over batch
    sizes 1..5: at most 2 graphs (batch 1, then one with a dynamic batch). ~20 s on 1 core."""
    from torch._dynamo.testing import CompileCounter

    from blsam.train.teacher import Teacher

    torch._dynamo.reset()
    cnt = CompileCounter()
    t = Teacher("tiny_vit", tiny_sam_ckpt, IMG, torch.device("cpu"))
    enc = t.build()
    compiled = torch.compile(enc, backend=cnt)
    with torch.inference_mode():
        for b in range(1, 6):
            x = torch.randn(b, 3, IMG, IMG)
            torch.testing.assert_close(compiled(x), enc(x), rtol=1e-5, atol=1e-5)
    assert cnt.frame_count <= 2, cnt.frame_count


def test_eval_predictor_equals_sam_predictor_in_fp32(sam):
    """Outside autocast, eval/zero_shot.py's ``Predictor`` is ``SamPredictor`` bit for bit."""
    from segment_anything import SamPredictor

    from blsam.evaluation.runner import Predictor

    g = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, IMG, IMG, generator=g)
    pts = torch.rand(3, 2, 2, generator=g) * IMG
    lab = torch.tensor([[1, 0], [1, -1], [0, 1]])
    box = torch.rand(3, 4, generator=g) * IMG
    mask_in = torch.randn(3, 1, LOW, LOW, generator=g)
    outs = []
    for cls in (SamPredictor, Predictor):
        p = cls(sam)
        with torch.no_grad():
            p.set_torch_image(image, (IMG, IMG))
            outs.append([p.predict_torch(pts, lab, b, m, multi, logits)
                         for b, m, multi, logits in ((None, None, True, False),
                                                     (box, mask_in, False, True))])
    for a, b in zip(*outs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ---------------------------------------------------------------- fake CUDA


class CpuTensors(TorchDispatchMode):
    """Inside a ``FakeTensorMode``: records every op that returns a CPU tensor, except
    ``lift_fresh`` (a tensor literal from Python data: ``torch.tensor(list)``, or a Python
    scalar written into a slice, which CUDA reads from the host without a sync). Mixing a CPU
    and a CUDA tensor raises in the fake mode itself."""

    def __init__(self) -> None:
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.aten.lift_fresh.default:
            for t in torch.utils._pytree.tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "cuda":
                    self.found.append((str(func), tuple(t.shape)))
        return out


def _fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda:0")


@pytest.mark.parametrize("variant", ["tiny_bl", "b_t", "h_b"])
@pytest.mark.parametrize("skip_padding", [False, True])
def test_student_encoder_on_fake_cuda_creates_nothing_on_the_cpu(variant, skip_padding):
    """The student is built on fake CUDA (no GPU, no memory: h_b's weights are not allocated)
    and runs outside the ``torch.device`` context, so a factory without ``device=`` would make a
    CPU tensor. ``skip_padding`` routes a data-dependent number of tokens (``.item()`` and
    Python control flow on it): fake tensors have no data, so that case is skipped."""
    if skip_padding:
        pytest.skip("skip_padding: data-dependent shapes (aten._local_scalar_dense) cannot run "
                    "on fake tensors, even with a ShapeEnv (GuardOnDataDependentSymNode)")
    mode, dev = _fake_cuda()
    with mode, dev:
        sam = blsam_model_registry[variant](sam_checkpoint=None, img_size=IMG)
        x = torch.randn(2, 3, IMG, IMG)
    with mode, CpuTensors() as cpu, torch.no_grad():
        y = sam.image_encoder(x)
    assert y.device == dev and y.shape == (2, 256, IMG // 16, IMG // 16)
    assert cpu.found == []


def test_teacher_and_distill_model_on_fake_cuda(monkeypatch):
    """Teacher (uncached, partly cached) and DistillModel's forward with every loss on fake CUDA
    inputs. Not covered here: backward (autograd needs a real CUDA context), pinning
    (``_to_device`` pins host copies; fake mode has no ``pin_memory``: replaced by ``.to``) and
    ``prompt_iters > 1`` (a CUDA ``torch.Generator`` needs a GPU)."""
    import blsam.train.teacher as teacher_mod
    from blsam.build_blsam import build_vanilla_sam
    from blsam.train.distill import DistillModel, set_trainable

    monkeypatch.setattr(teacher_mod, "_to_device", lambda x, d: x.to(d))
    mode, dev = _fake_cuda()
    with mode, dev:
        t = teacher_mod.Teacher("tiny_vit", None, IMG, dev)
        # Module.to() cannot swap fake parameters: the encoder is built on the device instead
        t.encoder = t._run = build_vanilla_sam("tiny_vit", None, img_size=IMG,
                                               fused=True).image_encoder.eval()
        sam = blsam_model_registry["tiny_bl"](sam_checkpoint=None, img_size=IMG)
        set_trainable(sam, "all")
        x = torch.randn(2, 3, IMG, IMG)
        cached = [None, torch.randn(256, IMG // 16, IMG // 16).half()]
        batch = {"kind": ["point", "box"],
                 "masks": [torch.zeros(2, LOW, LOW), torch.zeros(3, LOW, LOW)],
                 "boxes": [None, torch.rand(3, 4) * IMG],
                 "points": [torch.rand(2, 1, 2) * IMG, None],
                 "labels": [torch.ones(2, 1, dtype=torch.long), None], "seed": [1, 2],
                 "hw": [(IMG, IMG), (IMG, IMG - 16)]}
    with mode, CpuTensors() as cpu:
        full = t.embeddings(x, [None, None])
        part = t.embeddings(x, cached)
        out = DistillModel(sam, lambda_fd=1.0)(x, batch, full)
    assert full.device == part.device == dev
    assert {k: v.device for k, v in out.items()} == {k: dev for k in out}
    assert cpu.found == []


# ---------------------------------------------------------------- rank 0's writes (slow)


SLOW_WRITER = """
import os, sys, time
sys.path.insert(0, {root!r})
import blsam.train.checkpointer as checkpointer
import blsam.train.loop as loop
from blsam.tools.train import cli

def slow(fn):
    def wrapped(*a, **k):
        if os.environ["RANK"] == "0":
            time.sleep({delay})
        return fn(*a, **k)
    return wrapped

checkpointer.save_training_checkpoint = slow(checkpointer.save_training_checkpoint)
loop.save_atomic = slow(loop.save_atomic)
sys.exit(cli(sys.argv[1:]))
"""


@pytest.mark.slow
def test_rank0_writes_longer_than_the_process_group_timeout(tiny_sam_ckpt, tmp_path):
    """2 gloo ranks, --dist-timeout 6 s, every checkpoint and the final write on rank 0 take
    10 s: the other rank waits outside any collective (the store, --write-timeout) and the
    run completes (a barrier after the write timed out). ~60 s on 2 shared cores."""
    import json

    from blsam.train.tiny_sa1b import write_tiny_sa1b

    write_tiny_sa1b(tmp_path / "data", num_shards=2, images_per_shard=2, size=96, fmt="tar")
    wrapper = tmp_path / "slow_writer.py"
    wrapper.write_text(SLOW_WRITER.format(root=ROOT, delay=10))
    out = tmp_path / "run"
    argv = ["--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
            "--data", str(tmp_path / "data"), "--data-fraction", "1",
            "--sam-checkpoint", tiny_sam_ckpt, "--output-dir", str(out), "--img-size", "64",
            "--num-workers", "0", "--log-every", "1", "--no-progress", "--val-every", "0",
            "--masks-per-image", "2", "--prompt-types", "box", "--batch-size", "1",
            "--warmup-steps", "0", "--save-every", "1", "--keep-last", "0", "--max-steps", "2",
            "--device", "cpu", "--dist-timeout", "0.1", "--async-checkpoint", "off"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--monitor-interval", "0.2", str(wrapper), *argv]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 2 and summary["ranks_in_sync"]
    assert summary["write_timeout_min"] == 120.0
    assert (out / "final.pth").is_file() and (out / "last.pth").is_file()
