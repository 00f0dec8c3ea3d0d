"""The fused kernels on a GPU in bf16 (run on the device): they switch themselves on (Liger's fused linear
cross-entropy, gradient-accumulation fusion through ``addmm(out_dtype=fp32)``, Megatron-Core's fused SwiGLU,
cuDNN attention first); the 30-step loss curve equals the unfused one within bf16 tolerance for GPT-2 (tied, padded
vocabulary; the fused bias + GELU, the QKV bias epilogue and split, the loss mask in the GEMM epilogue) and Llama (GQA,
SwiGLU; grouped SDPA; the packed QKV RoPE and SwiGLU Triton kernels), both with the Triton norms fused with the residual
add and the AdamW kernel, with the defaults and with each candidate switched on too; the multi-tensor AdamW launches
equal the per-parameter kernel and torch's fused AdamW; the wgrad
GEMM equals an fp64 product of the same bf16 operands; the padded-vocabulary loss equals an fp64 loss over the cut
vocabulary; the Triton kernels are as close to fp32 as the bf16 paths they replace."""
import pytest
import torch

from interop.launch import run_on_ranks
from tests.test_trainer_kernels import _kernel_run
from trainer.kernels import KERNELS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def test_wgrad_gemm_accumulates_in_fp32_on_the_gpu():
    from trainer.kernels.grad_accum import WgradGemmAccum, cublas_aligned, cuda_kernel_available

    assert cuda_kernel_available()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 512, device="cuda", generator=gen).bfloat16()
    g = torch.randn(4096, 384, device="cuda", generator=gen).bfloat16()
    buffer = torch.randn(384 * 512 + 2, device="cuda", generator=gen)
    # aligned, and 8 bytes off (a view behind BERT's 2-element bias in Megatron-Core's flat grad buffer)
    for main_grad in (buffer[:384 * 512].view(384, 512), buffer[2:].view(384, 512)):
        assert cublas_aligned(main_grad) == (main_grad.storage_offset() == 0)
        expected = main_grad.double() + g.double().t() @ x.double()
        WgradGemmAccum.wgrad_gemm_accum_fp32(x, g, main_grad)
        err = (main_grad.double() - expected).norm() / expected.norm()
        assert main_grad.dtype == torch.float32 and err < 1e-5, float(err)  # fp32 accumulate: far below bf16's 4e-3


def test_first_write_gemm_overwrites_stale_fp32_on_the_gpu():
    """``wgrad_first_write``'s GEMM into a range the zeroing left alone (NaNs here: a stale buffer) writes the fp32
    product of the bf16 operands, aligned (cuBLAS with C = 0·C) and 8 bytes off (the aligned product copied in)."""
    from types import SimpleNamespace

    from trainer.kernels.grad_accum import WgradGemmAccum
    from trainer.kernels.wgrad_first_write import FirstWrite

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 512, device="cuda", generator=gen).bfloat16()
    g = torch.randn(4096, 384, device="cuda", generator=gen).bfloat16()
    expected = g.double().t() @ x.double()
    for offset in (0, 2):
        buffer = torch.full((384 * 512 + 2,), float("nan"), device="cuda")
        weight = torch.nn.Parameter(torch.empty(384, 512, device="cuda"))
        weight.main_grad = buffer[offset:offset + 384 * 512].view(384, 512)
        ddp = SimpleNamespace(buffers=[], params_with_grad=[weight], bucket_groups=[])
        tracker = FirstWrite(ddp)
        weight.grad_added_to_main_grad = False
        tracker.skipped = {id(weight)}  # as after a step whose first GEMM into it was this one
        WgradGemmAccum.wgrad_gemm_accum_fp32(x, g, weight.main_grad)
        assert tracker.first_writes == 1
        err = (weight.main_grad.double() - expected).norm() / expected.norm()
        assert err < 1e-5, (offset, float(err))


def _curve(data, family, vocab, disabled, candidates=()):
    from trainer import kernels

    kernels.disabled.update(disabled)
    kernels.enabled.update(candidates)  # the defaults and these candidates, or none at all
    return _kernel_run(data, family, 1, dict(mixed_precision="bf16", train_iters=30), (), None, vocab)


@pytest.mark.parametrize("candidates", [(), ("compiled_layer",), ("adamw_multi_tensor", "pinned_batches",
                                                                    "wgrad_first_write")],
                         ids=["defaults", "compiled_layer", "adamw_multi_tensor+pinned_batches+wgrad_first_write"])
@pytest.mark.parametrize("family,vocab", [("gpt2", 300), ("llama", None)], ids=["gpt2-padded-vocab", "llama"])
def test_fused_kernels_train_the_unfused_bf16_curve(tmp_path, family, vocab, candidates):
    from tests.test_trainer_helpers import write_corpus

    data = write_corpus(str(tmp_path / "counting"))
    fused, gaf, fused_loss, _, on = run_on_ranks(_curve, 1, data, family, vocab, (), candidates, timeout_s=600)[0]
    plain, gaf0, fused0, _, on0 = run_on_ranks(_curve, 1, data, family, vocab, KERNELS, timeout_s=600)[0]
    assert (gaf, fused_loss, gaf0, fused0) == (True, True, False, False)
    assert {"norm_kernel", "add_norm", "adamw_kernel", *candidates} <= on and on0 == set(), \
        (on, on0)
    expected = ({"bias_gelu_fusion", "bias_epilogue", "qkv_split", "padded_linear_cross_entropy", "loss_bias_epilogue"}
                if family == "gpt2" else {"qkv_rope", "sdpa_gqa", "swiglu_fusion", "swiglu_kernel",
                                          "linear_cross_entropy"})
    assert expected <= on, on
    assert len(fused) == 30 and plain[-1] < plain[0] - 0.5, plain
    assert fused == pytest.approx(plain, rel=2e-2, abs=2e-2)


def test_adamw_multi_tensor_steps_like_the_per_parameter_kernel_and_torch():
    """The ``adamw_multi_tensor`` launches on the GPU (a 2048 x 2048 matrix alone, GPT-2's small parameters batched,
    a clip factor in the second step, bf16 copies): parameters, moments and copies after three steps equal the
    per-parameter kernel's to fp32 rounding, and the parameters equal torch's fused AdamW (gradients scaled first)."""
    import types

    from trainer.kernels import adamw

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2048, 2048), (6144,), (2048,), (2048,), (8192,), (2048,)]
    params = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(3)]
    runs = {}
    for mode in ("multi", "single", "torch"):
        leaves = [p.clone() for p in params]
        copies = {id(leaf): torch.empty_like(leaf, dtype=torch.bfloat16) for leaf in leaves}
        groups = [{"params": leaves[:2], "weight_decay": 0.1}, {"params": leaves[2:], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-3, fused=mode == "torch")
        part = types.SimpleNamespace(optimizer=opt, _interop_copies=copies, _interop_steps={},
                                     **{adamw._MULTI: mode == "multi"})
        for i, step in enumerate(grads):
            scale = 0.25 if i == 1 else 1.0
            for leaf, grad in zip(leaves, step):
                leaf.grad = grad * scale if mode == "torch" else grad.clone()
            if mode == "torch":
                opt.step()
                continue
            setattr(part, adamw._SCALE, scale)
            adamw._step_with_ready_grads(part)
        runs[mode] = [t for leaf in leaves for t in (leaf, opt.state[leaf]["exp_avg"], opt.state[leaf]["exp_avg_sq"])]
        runs[mode + " copies"] = [c.float() for c in copies.values()]
    torch.testing.assert_close(runs["multi"], runs["single"])
    torch.testing.assert_close(runs["multi copies"], runs["single copies"], rtol=2 ** -8, atol=0)
    torch.testing.assert_close(runs["multi"][::3], runs["torch"][::3], rtol=1e-5, atol=1e-6)
    for leaf, copy in zip(runs["multi"][::3], runs["multi copies"]):
        assert torch.equal(copy, leaf.bfloat16().float())  # each copy: its updated parameter rounded to bf16


def test_qkv_split_packs_the_gradients_exactly_and_sums_them_in_fp32():
    """``qkv_split``'s backward kernel on bf16 gradients laid out as SDPA returns them: the packed gradient equals
    ``torch.cat`` bit for bit, and its column sums (the QKV bias gradient, fp32) equal the fp64 sums to fp32
    accumulation error (torch's ``sum(0)`` of the bf16 packed gradient rounds them to bf16 besides)."""
    from trainer.kernels.qkv_split import concat_with_column_sums

    gen = torch.Generator(device="cuda").manual_seed(0)
    for groups, per_group, head in ((16, 1, 128), (8, 4, 64)):
        grads = [torch.randn(2, groups, 2048, w, device="cuda", generator=gen).bfloat16().permute(2, 0, 1, 3)
                 for w in (per_group * head, head, head)]
        packed, sums = concat_with_column_sums(*grads)
        reference = torch.cat(grads, dim=3)
        assert torch.equal(packed, reference)
        exact = reference.double().reshape(4096, -1).sum(0)
        assert sums.dtype == torch.float32
        torch.testing.assert_close(sums.double(), exact, rtol=1e-5, atol=1e-3)


def test_cudnn_attention_matches_the_unfused_attention():
    """With cuDNN first (the default on a GPU) our attention still equals Megatron-Core's unfused one in bf16."""
    from tests.test_trainer_attention import _compare

    for heads, groups in ((8, 8), (8, 2)):
        out = run_on_ranks(_compare, 1, heads, groups, 256, 256, False, False, torch.bfloat16, timeout_s=300)[0]
        for a, b in zip(out["ours"], out["oracle"]):
            torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * float(b.abs().max()))


@pytest.mark.parametrize("epilogue", [False, True], ids=["liger", "loss_bias_epilogue"])
def test_padded_vocabulary_loss_matches_the_cut_vocabulary(epilogue, monkeypatch):
    """``padded_linear_cross_entropy``: the chunked loss over the padded weight with Liger's kernel, the padding
    columns masked by :func:`padding_bias` (added by Liger's pass, or in the GEMM's epilogue: ``loss_bias_epilogue``),
    equals an fp64 cross entropy over the weight cut to the true vocabulary, with ignored tokens and a gradient scale
    other than 1 (the trainer divides by the token count); the padding rows' gradient is exactly zero. Several chunks
    (``CHUNK_MEM_CONST`` lowered)."""
    from trainer.kernels import linear_cross_entropy as lce

    monkeypatch.setattr(lce._BiasEpilogueLoss, "apply", _counted(lce._BiasEpilogueLoss.apply))

    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab, padded = 1000, 1024
    hidden = torch.randn(4096, 256, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(padded, 256, device="cuda", generator=gen) * 0.2).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (4096,), device="cuda", generator=gen)
    target[::7] = lce.IGNORE_INDEX
    chunk_const, lce.CHUNK_MEM_CONST = lce.CHUNK_MEM_CONST, 1
    try:
        assert -(-padded // (lce.CHUNK_MEM_CONST * 256)) > 1  # Liger cuts the 4096 tokens into that many chunks
        loss = lce.linear_cross_entropy(hidden, weight, target, lce.padding_bias(weight, vocab), epilogue)
    finally:
        lce.CHUNK_MEM_CONST = chunk_const
    (loss / 3.0).backward()
    assert lce._BiasEpilogueLoss.apply.calls == int(epilogue)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double()[:vocab].requires_grad_()
    oracle = torch.nn.functional.cross_entropy(h64 @ w64.t(), target, reduction="sum",
                                               ignore_index=lce.IGNORE_INDEX)
    (oracle / 3.0).backward()
    torch.testing.assert_close(loss.double(), oracle, rtol=1e-3, atol=1e-3)
    assert weight.grad[vocab:].abs().max() == 0
    torch.testing.assert_close(weight.grad[:vocab].double(), w64.grad, rtol=2e-2,
                               atol=2e-2 * float(w64.grad.abs().max()))
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=2e-2, atol=2e-2 * float(h64.grad.abs().max()))


def _counted(fn):
    def wrapper(*args):
        wrapper.calls += 1
        return fn(*args)

    wrapper.calls = 0
    return wrapper


def test_bias_epilogue_gemm_equals_the_fp64_product_plus_bias():
    """``bias_epilogue``'s forward GEMM (``addmm`` with a 1-D bias: cuBLASLt's bias epilogue) is as close to an fp64
    ``x·Wᵀ + b`` as Megatron-Core's unfused ``matmul`` + add, with a perturbed, non-zero bias."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 512, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(1536, 512, device="cuda", generator=gen) * 0.05).bfloat16()
    b = (torch.randn(1536, device="cuda", generator=gen) + 1.0).bfloat16()
    oracle = x.double() @ w.double().t() + b.double()
    fused = torch.addmm(b, x, w.t()).double()
    unfused = (torch.matmul(x, w.t()) + b).double()
    err, ref = ((t - oracle).norm() / oracle.norm() for t in (fused, unfused))
    assert err < 1e-2 and err <= 1.5 * ref, (float(err), float(ref))


def test_compiled_rope_matches_megatron_cores_rope_in_bf16():
    """``rope_fusion``: Megatron-Core's ``apply_rotary_pos_emb`` compiled equals it eager in bf16, forward and
    gradient, for queries laid out as Megatron-Core's attention hands them over ([s, b, heads, d])."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from trainer.kernels.rope import _compiled

    gen = torch.Generator(device="cuda").manual_seed(0)
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    s, b, heads, d = 512, 2, 8, 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(s, device="cuda").float(), inv)
    freqs = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    t = torch.randn(s, b, heads, d, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(s, b, heads, d, device="cuda", generator=gen).bfloat16()
    out = []
    for fn in (_compiled, apply_rotary_pos_emb):
        ti = t.clone().requires_grad_()
        y = fn(ti, freqs, config, cp_group=SimpleNamespace())  # context parallelism: not used by the bshd path
        y.backward(dy)
        out.append((y, ti.grad))
    for a, ref in zip(*out):
        torch.testing.assert_close(a.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.float().abs().max()))
    assert not torch.equal(out[1][0], t)  # the rotation is not the identity


def _bf16_errors(fused, unfused, oracle):
    """Relative errors (vs an fp32 oracle) of the kernel's and of the unfused bf16 path's tensors."""
    out = []
    for a, b, ref in zip(fused, unfused, oracle):
        scale = ref.float().norm()
        out.append((float((a.float() - ref).norm() / scale), float((b.float() - ref).norm() / scale)))
    return out


def _run(fn, inputs, grads):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    torch.autograd.backward(outs, grads)
    return outs + [leaf.grad for leaf in leaves]


def test_triton_kernels_are_as_close_to_fp32_as_megatron_cores_bf16_paths():
    """``qkv_rope``, ``swiglu_kernel``, ``norm_kernel`` and ``add_norm`` in bf16 at 1B-like shapes: outputs and
    gradients (the norms' weight and bias gradients, the added bias's too) within 1e-2 of an fp32 oracle and no
    further from it than the bf16 path they replace (split + compiled RoPE; Megatron-Core's fused SwiGLU; torch's
    LayerNorm / RMSNorm, after Megatron-Core's bias-dropout-add)."""
    from types import SimpleNamespace

    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from trainer.kernels import norm
    from trainer.kernels.qkv_rope import packed_qkv_rope, reference_qkv_rope
    from trainer.kernels.rope import _compiled
    from trainer.kernels.swiglu import swiglu

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    s, b, ng, qpg, hn = 1024, 4, 8, 4, 64
    inv = 1.0 / (10000 ** (torch.arange(0, hn, 2, device="cuda").float() / hn))
    freqs = torch.outer(torch.arange(s, device="cuda").float(), inv)
    freqs = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    split = [qpg * hn, hn, hn]
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)

    def megatron_rope(qkv):
        query, key, value = torch.split(qkv, split, dim=3)
        query = query.reshape(s, b, -1, hn)
        cp = SimpleNamespace()
        return _compiled(query, freqs, config, cp_group=cp), _compiled(key, freqs, config, cp_group=cp), value

    qkv = randn(s, b, ng, (qpg + 2) * hn)
    grads = [randn(s, b, ng * qpg, hn), randn(s, b, ng, hn), randn(s, b, ng, hn)]
    cases = [("rope", lambda x: packed_qkv_rope(x, freqs, freqs, split), megatron_rope,
              lambda x: reference_qkv_rope(x, freqs, freqs, split), [qkv], grads)]
    y, g = randn(8192, 2 * 2048, scale=2.0), randn(8192, 2048)
    cases.append(("swiglu", swiglu, lambda t: bias_swiglu_impl(t, None),
                  lambda t: torch.nn.functional.silu(t.chunk(2, -1)[0]) * t.chunk(2, -1)[1], [y], [g]))
    x, g = randn(16384, 2048, scale=2.0) + 0.5, randn(16384, 2048)
    w, c = randn(2048, scale=0.3) + 1.0, randn(2048, scale=0.3)
    f = torch.nn.functional
    cases.append(("layernorm", lambda t, w, c: norm._apply(t, w, c, 1e-5, rms=False),
                  lambda t, w, c: f.layer_norm(t, (2048,), w, c, 1e-5),
                  lambda t, w, c: f.layer_norm(t, (2048,), w, c, 1e-5), [x, w, c], [g]))
    cases.append(("rmsnorm", lambda t, w: norm._apply(t, w, None, 1e-5, rms=True),
                  lambda t, w: f.rms_norm(t, (2048,), w, 1e-5), lambda t, w: f.rms_norm(t, (2048,), w, 1e-5),
                  [x, w], [g]))
    r, gh = randn(16384, 2048, scale=2.0), randn(16384, 2048)

    def added(norm_fn):  # Megatron-Core's bias-dropout-add (two roundings in bf16), then the norm
        return lambda t, c, r, *p: (lambda h: (h, norm_fn(h, *p)))(r + (t + c if c is not None else t))

    cases.append(("add+layernorm", lambda t, c, r, w, nb: norm._AddNorm.apply(t, c, r, w, nb, 1e-5, False),
                  added(lambda h, w, nb: f.layer_norm(h, (2048,), w, nb, 1e-5)),
                  added(lambda h, w, nb: f.layer_norm(h, (2048,), w, nb, 1e-5)), [x, c, r, w, c * 0.5], [gh, g]))
    cases.append(("add+rmsnorm", lambda t, r, w: norm._AddNorm.apply(t, None, r, w, None, 1e-5, True),
                  lambda t, r, w: added(lambda h, w: f.rms_norm(h, (2048,), w, 1e-5))(t, None, r, w),
                  lambda t, r, w: added(lambda h, w: f.rms_norm(h, (2048,), w, 1e-5))(t, None, r, w), [x, r, w],
                  [gh, g]))
    for name, ours, megatron, oracle, inputs, out_grads in cases:
        fused = _run(ours, inputs, out_grads)
        unfused = _run(megatron, inputs, out_grads)
        exact = _run(oracle, [t.float() for t in inputs], [t.float() for t in out_grads])
        for err, ref in _bf16_errors(fused, unfused, exact):
            assert err < 1e-2 and err <= 1.5 * ref + 1e-4, (name, err, ref)
