"""float32 linear layers on oneDNN (grpokit.models.cpu_linear): the math against float64, the fallbacks, the
conversion of a model, and the sampler/trainer log-probs on a converted model."""

import copy
import dataclasses
import platform

import pytest
import torch

from grpokit.algo.batches import pack
from grpokit.errors import ConfigError
from grpokit.models import cpu_linear
from grpokit.models.logprobs import completion_logps
from grpokit.rollout.base import SamplingParams
from grpokit.rollout.torch_engine import TorchEngine

# torch's x86-64 wheels (the pinned torch==2.13.0 among them) ship oneDNN's linear op; elsewhere it may be missing,
# and grpokit then keeps torch's kernel. On x86-64 a missing op is a failure (below), never a skip.
X86_ONLY = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                              reason="oneDNN's linear op is only required of torch's x86-64 builds")


@X86_ONLY
def test_onednn_linear_op_runs_with_the_installed_torch():
    assert cpu_linear.onednn_available(), "torch.ops.mkldnn._linear_pointwise is missing or fails in this torch build"


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN matrix products (forward and backward)."""
    calls = []
    real = cpu_linear._matmul

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(cpu_linear, "_matmul", counting)
    return calls


def _reference(x, weight, bias, grad_out):
    """float64 forward and gradients of x @ weight.T + bias, by autograd on float64 copies."""
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    out = x64 @ w64.T + (0 if b64 is None else b64)
    out.backward(grad_out.double())
    return out, x64.grad, w64.grad, None if b64 is None else b64.grad


def _close(got, want, what):
    # float32 products of length-K sums: error grows like sqrt(K) * eps * |terms|; scale by the reference's size
    scale = want.abs().max().item() + 1e-12
    err = (got.double() - want).abs().max().item()
    assert err <= 2e-6 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@X86_ONLY
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("lead", "features", "out_features", "bias", "layout"), [
    ((7,), 5, 3, True, "contiguous"),
    ((2, 9), 64, 96, False, "contiguous"),
    ((4, 33), 48, 17, True, "transposed"),  # a non-contiguous input (a transpose of [33, 4, 48])
    ((1,), 576, 1536, False, "contiguous"),  # one decode row of a 135M model's MLP
    ((3, 130), 96, 513, True, "sliced"),  # a strided slice of a wider tensor
])
def test_forward_and_gradients_match_float64(seed, lead, features, out_features, bias, layout, onednn_calls):
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        x = torch.randn(lead[1], lead[0], features, generator=gen).transpose(0, 1)
    elif layout == "sliced":
        x = torch.randn(*lead, features + 11, generator=gen)[..., 5:5 + features]
    else:
        x = torch.randn(*lead, features, generator=gen)
    assert (layout == "contiguous") == x.is_contiguous()
    x.requires_grad_()
    weight = (torch.randn(out_features, features, generator=gen) / features ** 0.5).requires_grad_()
    b = torch.randn(out_features, generator=gen).requires_grad_() if bias else None
    grad_out = torch.randn(*lead, out_features, generator=gen)

    out = cpu_linear.linear(x, weight, b)
    out.backward(grad_out)
    assert len(onednn_calls) == 3, "forward, input gradient and weight gradient all run on oneDNN"
    want, want_x, want_w, want_b = _reference(x, weight, b, grad_out)
    assert out.shape == want.shape and out.dtype == torch.float32
    _close(out, want, "output")
    _close(x.grad, want_x, "input gradient")
    _close(weight.grad, want_w, "weight gradient")
    if bias:
        _close(b.grad, want_b, "bias gradient")
    # and equal to torch's own float32 linear up to rounding
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@X86_ONLY
def test_a_frozen_weight_gets_no_gradient_and_costs_no_product(onednn_calls):
    x = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(4, 8)  # frozen, as a LoRA base layer
    cpu_linear.linear(x, weight).sum().backward()
    assert len(onednn_calls) == 2 and weight.grad is None
    _close(x.grad, torch.ones(6, 4, dtype=torch.float64) @ weight.double(), "input gradient")


@pytest.mark.parametrize("case", ["float64", "bfloat16 weights", "autocast"])
def test_other_calls_take_torch_linear_unchanged(case, onednn_calls):
    x, weight, bias = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    if case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    elif case == "bfloat16 weights":
        x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = cpu_linear.linear(x, weight, bias)
        want = torch.nn.functional.linear(x, weight, bias)
    assert onednn_calls == []
    assert got.dtype == want.dtype and torch.equal(got, want)


@X86_ONLY
@pytest.mark.parametrize(("rows", "features", "out_features", "bias"), [(64, 576, 1536, False), (5, 48, 17, True),
                                                                       ((3, 1), 96, 513, True)])
def test_packed_weights_serve_no_grad_calls_and_match_float64(rows, features, out_features, bias, monkeypatch):
    """Inside `packed_weights` a layer's no-grad calls use the weight reordered once (a oneDNN tensor), with the
    float64 result; calls that need gradients keep the plain weight; leaving the context drops the copy."""
    weights_used = []
    real = cpu_linear._matmul
    monkeypatch.setattr(cpu_linear, "_matmul", lambda a, w, b=None: weights_used.append(w.is_mkldnn) or real(a, w, b))
    gen = torch.Generator().manual_seed(rows if isinstance(rows, int) else 9)
    layer = torch.nn.Linear(features, out_features, bias=bias)
    model = torch.nn.Sequential(layer, torch.nn.Linear(out_features, 2))
    assert cpu_linear.use_onednn(model, min_weight=out_features * features) == 1  # the second stays plain
    lead = (rows,) if isinstance(rows, int) else rows
    x = torch.randn(*lead, features, generator=gen)
    with cpu_linear.packed_weights(model) as packed:
        assert packed == 1 and layer._packed is not None
        with torch.no_grad():
            out = layer(x)
        assert weights_used == [True]
        x_grad = x.clone().requires_grad_()
        layer(x_grad).sum().backward()
        assert weights_used[1:] == [False, False, False] and layer.weight.grad is not None
    assert layer._packed is None
    want = x.double() @ layer.weight.detach().double().T + (layer.bias.detach().double() if bias else 0)
    assert out.shape == want.shape
    _close(out, want, "packed output")


class _Quantised(torch.nn.Linear):
    """Stands for a subclass such as bitsandbytes' Linear4bit: its own forward must be kept."""


def test_use_onednn_converts_plain_linears_only_and_restores(tiny_model):
    model, _ = tiny_model
    model.extra = _Quantised(4, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert plain > 0
    assert cpu_linear.use_onednn(model) == plain
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    assert type(model.extra) is _Quantised and type(model.lm_head) is cpu_linear.OneDNNLinear
    assert isinstance(model.lm_head, torch.nn.Linear)  # code that checks isinstance still sees a Linear
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert type(copy.deepcopy(model).lm_head) is cpu_linear.OneDNNLinear  # the frozen reference copy keeps it
    cpu_linear.restore(model)
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == plain


def test_apply_follows_the_setting_device_and_vendor(tiny_model, monkeypatch):
    model, _ = tiny_model
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_linear.apply(model, "auto", "cpu") is False
    assert cpu_linear.apply(model, "torch", "cpu") is False
    assert cpu_linear.apply(copy.deepcopy(model), "onednn", "cuda") is False
    assert type(model.lm_head) is torch.nn.Linear
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_linear.apply(model, "auto", "cpu") is False, "auto leaves a tiny model's layers to torch"
    big = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(4, 4))
    assert cpu_linear.apply(big, "auto", "cpu") is cpu_linear.onednn_available()
    assert [type(m) for m in big] == [cpu_linear.OneDNNLinear, torch.nn.Linear]
    assert cpu_linear.apply(model, "onednn", "cpu") is True and type(model.lm_head) is cpu_linear.OneDNNLinear
    cpu_linear.restore(model)
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    assert cpu_linear.apply(model, "auto", "cpu") is False
    with pytest.raises(ConfigError, match="cpu_linear: onednn, but this torch build"):
        cpu_linear.apply(model, "onednn", "cpu")


def test_an_unknown_setting_is_refused_wherever_it_is_passed(tiny_model):
    model, _ = tiny_model
    import typing

    from grpokit.config.schema import GRPOConfig
    assert typing.get_args(GRPOConfig.model_fields["cpu_linear"].annotation) == cpu_linear.MODES
    with pytest.raises(ValueError, match=r"TorchEngine\(cpu_linear\)='mkl' is not a cpu_linear setting: use one of "
                                         r"'auto', 'onednn', 'torch'"):
        TorchEngine(model, 0, cpu_linear="mkl")
    with pytest.raises(ValueError, match="cpu_linear='oneDNN' is not a cpu_linear setting"):
        cpu_linear.apply(model, "oneDNN", "cpu")  # which would have put every layer on oneDNN
    with pytest.raises(ValueError, match="cpu_linear='Auto' is not"):
        cpu_linear.mkl_rows("Auto", "cpu", 8)
    assert type(model.lm_head) is torch.nn.Linear
    for mode in cpu_linear.MODES:
        assert TorchEngine(model, 0, cpu_linear=mode).cpu_linear == mode


def test_cpu_vendor_is_read():
    assert isinstance(cpu_linear.cpu_vendor(), str)


@X86_ONLY
def test_sampler_logps_equal_trainer_logps_on_onednn(tiny_model, onednn_calls):
    """On a converted model the sampler's log-probs are still the trainer's (the LM head chunks on oneDNN too),
    and close to the unconverted model's."""
    model, tokenizer = tiny_model
    converted = copy.deepcopy(model)
    cpu_linear.use_onednn(converted)
    prompts = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "Hi", "A longer prompt about 17 - 4.")]
    params = SamplingParams(max_tokens=10, temperature=0.7, seed=3)
    rollout = TorchEngine(converted, 0).generate(prompts, 4, params)
    assert onednn_calls, "the sampler's forward ran on oneDNN"
    rows = [p for p in prompts for _ in range(4)]
    input_ids, attention, cmask = pack(rows, rollout.completion_ids, 0, "cpu")
    onednn_calls.clear()
    logps, _ = completion_logps(converted, input_ids, attention, cmask.shape[1], temperature=0.7, chunk_size=7)
    head_calls = [shape for shape in onednn_calls if shape[0] <= 7]
    assert head_calls, "the LM head's chunks ran on oneDNN"
    with torch.no_grad():
        plain, _ = completion_logps(model, input_ids, attention, cmask.shape[1], temperature=0.7, chunk_size=7)
    for i, sampled in enumerate(rollout.sampler_logps):
        n = len(sampled)
        torch.testing.assert_close(logps[i, :n].detach(), torch.tensor(sampled), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logps[i, :n].detach(), plain[i, :n], rtol=1e-4, atol=1e-5)


def _recompute(model, prompts, rollout, temperature, entropy=False):
    """The trainer's log-probs of a rollout's completions ([rows, T]; each prompt's rows in turn), and with `entropy`
    its entropies too."""
    group = len(rollout.completion_ids) // len(prompts)
    input_ids, attention, cmask = pack([p for p in prompts for _ in range(group)], rollout.completion_ids, 0, "cpu")
    with torch.no_grad():
        out = completion_logps(model, input_ids, attention, cmask.shape[1], temperature=temperature, chunk_size=7)
    return out if entropy else out[0]


@X86_ONLY
@pytest.mark.parametrize(("setting", "converted"), [("onednn", True), ("torch", False)])
def test_eval_and_generate_load_the_model_with_the_setting(tiny_model_dir, setting, converted):
    """`grpokit eval` / `generate` load through inference._load, which applies cpu_linear as training does."""
    from grpokit.config import validate_config
    from grpokit.evaluation import inference

    cfg = validate_config({"model": str(tiny_model_dir), "device": "cpu", "cpu_linear": setting})
    model, _, engine, _ = inference._load(cfg)
    assert (type(model.lm_head) is cpu_linear.OneDNNLinear) is converted and engine.model is model
    assert engine.cpu_linear == setting  # the sampler packs (or not) as the setting asks


@pytest.mark.parametrize("setting", ["auto", "torch"])
def test_the_trainer_s_sampler_takes_the_setting(tiny_model_dir, tmp_path, monkeypatch, setting):
    from grpokit.config import validate_config
    from grpokit.train.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n')
    cfg = validate_config({"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run",
                           "device": "cpu", "reward_funcs": ["answer_format"], "num_generations": 2,
                           "per_device_train_batch_size": 2, "max_steps": 1, "cpu_linear": setting})
    assert Trainer(cfg).engine.cpu_linear == setting


@X86_ONLY
def test_bf16_generation_packs_weights_once_and_its_logps_match_the_trainers_bf16_recompute(tiny_model, monkeypatch):
    """Under bf16 autocast the sampler's linear layers run on bf16 copies packed once per `generate` (then every
    layer is as it was); its log-probs match the trainer's autocast recompute of the same ids within 0.02 nats
    (bf16 keeps 8 bits of mantissa: logits of magnitude ~1-10 round by up to ~0.004-0.03, and the two paths
    round different products and sums); with the packing off, the autocast sampler's log-probs are as close.
    Its entropies (asked for as a run asks for them) match the recompute's within 2e-3 nats (measured: 2e-4 on this
    near-uniform tiny model, whose entropy moves 7e-3 between temperature 0.7 and 1), and asking moves no token."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support in oneDNN: autocast's own path is used, nothing to compare")
    model, tokenizer = tiny_model
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)  # the tiny model's layers are below the size threshold
    state = {k: v.clone() for k, v in model.state_dict().items()}
    packed_calls = []
    real = cpu_linear._matmul
    monkeypatch.setattr(cpu_linear, "_matmul",
                        lambda a, w, b=None: packed_calls.append((a.dtype, w.is_mkldnn)) or real(a, w, b))
    prompts = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "Hi", "A longer prompt about 17 - 4.")]
    params = SamplingParams(max_tokens=10, temperature=0.7, seed=3)
    linears = sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = TorchEngine(model, 0).generate(prompts, 4, dataclasses.replace(params, entropies=True))
    assert packed_calls and set(packed_calls) == {(torch.bfloat16, True)}
    assert sum(1 for m in model.modules() if type(m) is torch.nn.Linear) == linears  # classes put back
    assert not any(hasattr(m, "_packed_bf16") and "_packed_bf16" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    packed_calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, entropy = _recompute(model, prompts, rollout, temperature=0.7, entropy=True)
    assert not packed_calls  # the trainer's recompute takes autocast's own path
    worst = worst_entropy = 0.0
    for i, (sampled, entropies) in enumerate(zip(rollout.sampler_logps, rollout.sampler_entropies, strict=True)):
        n = len(sampled)
        assert len(entropies) == n
        worst = max(worst, (logps[i, :n].float() - torch.tensor(sampled)).abs().max().item())
        worst_entropy = max(worst_entropy, (entropy[i, :n].float() - torch.tensor(entropies)).abs().max().item())
    assert worst < 0.02, worst
    assert worst_entropy < 2e-3, worst_entropy
    monkeypatch.setattr(cpu_linear, "_bf16_packing_applies", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = TorchEngine(model, 0).generate(prompts, 4, params)
    assert not packed_calls
    # the two paths round apart, so a near tie may draw another token (it did once each prompt's keys were read
    # once for its rows): what holds is that each path's log-probs are its recompute's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_logps, _ = _recompute(model, prompts, plain, temperature=0.7, entropy=True)
    assert max((plain_logps[i, :len(s)].float() - torch.tensor(s)).abs().max().item()
               for i, s in enumerate(plain.sampler_logps)) < 0.02
    assert sum(a == b for a, b in zip(plain.completion_ids, rollout.completion_ids, strict=True)) >= 10  # of 12


def test_fp32_generation_never_packs_bf16(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
    seen = []
    real = cpu_linear._packed_bf16
    monkeypatch.setattr(cpu_linear, "_packed_bf16", lambda m, r: seen.append(1) or real(m, r))
    TorchEngine(model, 0).generate([tokenizer("Hi")["input_ids"]], 2, SamplingParams(max_tokens=4, seed=1))
    assert seen == []


# MKL's packed GEMM for the sampler's float32 products (cpu_linear auto on Intel CPUs)

@X86_ONLY
def test_mkl_packed_op_runs_with_the_installed_torch():
    assert cpu_linear.mkl_packed_available(), "torch.ops.mkl._mkl_linear is missing or fails in this torch build"


@pytest.fixture
def mkl_calls(monkeypatch):
    """Counts the products on MKL's packed GEMM (their row counts)."""
    calls = []
    real = cpu_linear._mkl_product

    def counting(a, *args):
        calls.append(a.shape[0])
        return real(a, *args)

    monkeypatch.setattr(cpu_linear, "_mkl_product", counting)
    return calls


@X86_ONLY
@pytest.mark.parametrize(("packed_rows", "lead", "served"), [
    (8, (8,), True), (8, (5,), True),  # 5 rows padded to the 8 packed for
    (8, (4,), False),  # half or fewer: MKL's plain sgemm (padding would cost more than it saves)
    (8, (9,), False),  # more rows than packed for (a prefill)
    (6, (2, 3), True),  # [2, 3, K]: 6 rows
    (64, (64,), True), (64, (40,), True)])
@pytest.mark.parametrize("bias", [False, True])
def test_mkl_packed_weights_serve_no_grad_calls_and_match_float64(packed_rows, lead, served, bias, mkl_calls):
    """Inside `packed_weights(mkl_rows=N)` the plain layers of at least AUTO_MIN_WEIGHT weights serve their no-grad
    calls of N/2 < rows <= N on MKL's packed GEMM with the float64 result; other calls, calls that need gradients
    and smaller layers take nn.Linear unchanged (bit for bit); leaving the context puts every layer back."""
    gen = torch.Generator().manual_seed(packed_rows + len(lead))
    big = torch.nn.Linear(160, 128, bias=bias)  # 20,480 weights >= AUTO_MIN_WEIGHT
    small = torch.nn.Linear(128, 16)
    model = torch.nn.Sequential(big, small)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(*lead, 160, generator=gen)
    with cpu_linear.packed_weights(model, mkl_rows=packed_rows) as packed:
        assert packed == 1 and type(big) is cpu_linear.PackedMKLLinear and type(small) is torch.nn.Linear
        with torch.no_grad():
            out = big(x)
            assert torch.equal(small(out), torch.nn.functional.linear(out, small.weight, small.bias))
        assert mkl_calls == ([packed_rows] if served else [])
        x_grad = x.clone().requires_grad_()
        with_grad = big(x_grad)
        with_grad.sum().backward()
        assert len(mkl_calls) == int(served) and big.weight.grad is not None
        assert torch.equal(with_grad.detach(), torch.nn.functional.linear(x, big.weight, big.bias))
    assert type(big) is torch.nn.Linear and not {"_packed_mkl", "_rows"} & big.__dict__.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    want = x.double() @ big.weight.detach().double().T + (big.bias.detach().double() if bias else 0)
    assert out.shape == want.shape
    _close(out, want, "MKL-packed output")
    if not served:
        assert torch.equal(out, torch.nn.functional.linear(x, big.weight, big.bias))


@X86_ONLY
def test_fit_packed_repacks_as_the_batch_halves_and_drops_the_copy_below_the_minimum(mkl_calls, monkeypatch):
    repacked = []
    real = torch.ops.mkl._mkl_reorder_linear_weight
    monkeypatch.setattr(cpu_linear, "_mkl_pack", lambda w, rows: repacked.append(rows) or real(w, rows))
    layer = torch.nn.Linear(160, 128)
    model = torch.nn.Sequential(layer)
    x = torch.randn(16, 160)
    want = x.double() @ layer.weight.detach().double().T + layer.bias.detach().double()
    with torch.no_grad(), cpu_linear.packed_weights(model, mkl_rows=16):
        assert repacked == [16]
        for rows, changed, packed_for, packs in [(12, 0, 16, [16]), (9, 0, 16, [16]), (8, 1, 8, [16, 8]),
                                                 (6, 0, 8, [16, 8]), (4, 1, 4, [16, 8, 4]), (3, 1, None, [16, 8, 4]),
                                                 (2, 0, None, [16, 8, 4])]:
            assert cpu_linear.fit_packed(model, rows) == changed, rows
            assert repacked == packs, rows
            assert (layer._packed_mkl is None) is (packed_for is None)
            mkl_calls.clear()
            _close(layer(x[:rows]), want[:rows], f"{rows} rows")
            assert mkl_calls == ([packed_for] if packed_for else []), rows
    with torch.no_grad(), cpu_linear.packed_weights(model, mkl_rows=5):  # 3 of 5 rows: not halved, but below 4
        assert cpu_linear.fit_packed(model, 4) == 0 and cpu_linear.fit_packed(model, 3) == 1
        assert layer._packed_mkl is None
    assert type(layer) is torch.nn.Linear


def test_mkl_rows_follows_the_setting_device_vendor_and_batch(monkeypatch):
    monkeypatch.setattr(cpu_linear, "mkl_packed_available", lambda: True)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_linear.mkl_rows("auto", "cpu", 8) == 8
    assert cpu_linear.mkl_rows("auto", "cpu", cpu_linear.MKL_MIN_ROWS - 1) is None
    assert cpu_linear.mkl_rows("torch", "cpu", 8) is None, "torch keeps MKL's plain sgemm"
    assert cpu_linear.mkl_rows("onednn", "cpu", 8) is None
    assert cpu_linear.mkl_rows("auto", "cuda", 8) is None
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_linear.mkl_rows("auto", "cpu", 8) is None, "auto puts AMD's layers on oneDNN"
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(cpu_linear, "mkl_packed_available", lambda: False)
    assert cpu_linear.mkl_rows("auto", "cpu", 8) is None


@X86_ONLY
@pytest.mark.parametrize("path", ["lean", "model"])
def test_sampler_on_mkl_packed_weights_matches_the_trainers_logps_and_torch_settings_rollouts(tiny_model, mkl_calls,
                                                                                             monkeypatch, path):
    """cpu_linear auto on an Intel CPU: the sampler's decode products run packed for the batch (repacked as the
    batch halves, dropped below MKL_MIN_ROWS), its log-probs are the trainer's recompute within float32 rounding,
    and the model is as it was after; cpu_linear torch never packs. lean: the Llama model decodes on the lean
    decoder's fused products, which hold the packed copies (the layers stay plain); model: a model without the lean
    path decodes on its own layers, packed in place."""
    from grpokit.rollout import torch_engine

    model, tokenizer = tiny_model
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)  # the tiny model's layers are below the size threshold
    if path == "model":
        monkeypatch.setattr(torch_engine, "lean_mode", lambda m: None)
    packs, fitted = [], []
    real_pack, real_fit = cpu_linear._mkl_pack, cpu_linear.fit_packed
    monkeypatch.setattr(cpu_linear, "_mkl_pack", lambda w, rows: packs.append(rows) or real_pack(w, rows))
    monkeypatch.setattr(cpu_linear, "fit_packed", lambda m, rows: fitted.append(rows) or real_fit(m, rows))
    layer_classes = []
    real_product = cpu_linear._mkl_product
    monkeypatch.setattr(cpu_linear, "_mkl_product", lambda *a: layer_classes.append(
        {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}) or real_product(*a))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "Hi", "A longer prompt about 17 - 4.")]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, stop_token_ids=list(range(20, 30)))
    rollout = TorchEngine(model, 0, cpu_linear="auto").generate(prompts, 4, params)
    finished = sorted((len(c) for c in rollout.completion_ids), reverse=True)
    assert finished[5] < 12, ("the test needs the batch to halve", finished)
    products = 15 if path == "model" else 9  # 7 layers or 4 fused products per decoder layer, and the head
    assert packs[:products] == [12] * products and 6 in packs, packs  # packed for the batch, again at half
    assert set(packs) <= {12, 6, 5}, packs
    assert 12 in mkl_calls and set(mkl_calls) <= set(packs), (mkl_calls, packs)
    if path == "lean":
        assert fitted == [] and layer_classes and all(c == {torch.nn.Linear} for c in layer_classes)
    else:
        assert fitted and all(cpu_linear.PackedMKLLinear in c for c in layer_classes)
    assert sum(1 for m in model.modules() if type(m) is torch.nn.Linear) == 15  # 7 per layer and the head
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    logps = _recompute(model, prompts, rollout, temperature=1.0)
    for i, sampled in enumerate(rollout.sampler_logps):
        torch.testing.assert_close(logps[i, :len(sampled)], torch.tensor(sampled), rtol=1e-4, atol=1e-5)
    mkl_calls.clear()
    TorchEngine(model, 0, cpu_linear="torch").generate(prompts, 4, params)
    assert mkl_calls == []
