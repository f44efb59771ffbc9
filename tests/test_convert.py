"""convert(model): PyTorch's transposed convolutions become tritondeconv's in place, by a
change of class.  The model keeps its structure (a shared module stays one module), its
modules' identity, parameters, buffers, hooks, normalisations and parametrizations,
training mode and state-dict keys; convert returns it.  Numeric checks compare with
PyTorch's unconverted copy in float64."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import TOLERANCES, assert_close, computed_as, fresh_seed, layout, relative_error
from torch.nn.utils import parametrizations, parametrize

import tritondeconv
from tritondeconv.kernels.common import observe_launches

F64 = torch.float64
TOLERANCE = TOLERANCES["float64"]
OURS = {1: tritondeconv.nn.ConvTranspose1d, 2: tritondeconv.nn.ConvTranspose2d, 3: tritondeconv.nn.ConvTranspose3d}
THEIRS = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}
SPATIAL = {1: (4,), 2: (3, 3), 3: (2, 2, 3)}


def _deconv(device="cpu", rank=2, in_channels=3, out_channels=3, **kwargs):
    """A small float64 PyTorch transposed convolution (kernel 3, stride 2, padding 1 unless told)."""
    kwargs = {"kernel_size": 3, "stride": 2, "padding": 1, **kwargs}
    return THEIRS[rank](in_channels, out_channels, device=device, dtype=F64, **kwargs)


def _input(device, rank=2, channels=3):
    return torch.randn(2, channels, *SPATIAL[rank], device=device, dtype=F64)


def _assert_same_function(model, reference, x, seed):
    """``model`` computes what ``reference`` does on ``x``: the output, the input's
    gradient and every parameter's gradient (the same names, in the same order)."""
    inputs = [x.detach().clone().requires_grad_() for _ in range(2)]
    out, ref = model(inputs[0]), reference(inputs[1])
    assert relative_error(out, ref) <= TOLERANCE, f"output (seed {seed})"
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert relative_error(inputs[0].grad, inputs[1].grad) <= TOLERANCE, f"input gradient (seed {seed})"
    names = [name for name, _ in reference.named_parameters()]
    assert [name for name, _ in model.named_parameters()] == names
    for name, p, q in zip(names, model.parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) <= TOLERANCE, f"gradient of {name} (seed {seed})"


# ---------------------------------------------------------------- what it returns


def test_returns_the_model_converted_in_place():
    model = torch.nn.Sequential(_deconv(), torch.nn.ReLU(), _deconv(out_channels=2))
    modules = list(model.modules())
    assert tritondeconv.convert(model) is model
    assert all(a is b for a, b in zip(model.modules(), modules))
    assert [type(m) for m in model] == [OURS[2], torch.nn.ReLU, OURS[2]]


def test_return_count_gives_the_model_and_how_many_were_converted():
    model = torch.nn.Sequential(_deconv(), torch.nn.ReLU(), _deconv(out_channels=2))
    assert tritondeconv.convert(model, return_count=True) == (model, 2)
    assert tritondeconv.convert(model, return_count=True) == (model, 0)  # nothing left to convert


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_a_bare_module_is_converted(device, rank):
    seed = fresh_seed()
    module = _deconv(device, rank)
    reference = copy.deepcopy(module)
    assert tritondeconv.convert(module, return_count=True) == (module, 1)
    assert type(module) is OURS[rank]
    _assert_same_function(module, reference, _input(device, rank), seed)


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match="convert: expected model to be a torch.nn.Module"):
        tritondeconv.convert([_deconv()])


# ---------------------------------------------------------------- the model stays whole


def test_a_module_registered_twice_stays_one_module(device):
    seed = fresh_seed()
    deconv = _deconv(device)
    model = torch.nn.Sequential(deconv, torch.nn.Tanh(), deconv)
    reference = copy.deepcopy(model)
    assert tritondeconv.convert(model, return_count=True) == (model, 1)
    assert model[0] is deconv and model[2] is deconv and type(deconv) is OURS[2]
    _assert_same_function(model, reference, _input(device), seed)


def test_a_module_shared_by_two_parents_stays_shared(device):
    seed = fresh_seed()
    deconv = _deconv(device)
    first, second = torch.nn.Sequential(deconv, torch.nn.Tanh()), torch.nn.Sequential(torch.nn.ReLU(), deconv)
    model = torch.nn.Sequential(first, second)
    reference = copy.deepcopy(model)
    tritondeconv.convert(first)  # converting one parent converts it for the other
    assert first[0] is deconv and second[1] is deconv and type(deconv) is OURS[2]
    assert tritondeconv.convert(model, return_count=True) == (model, 0)
    _assert_same_function(model, reference, _input(device), seed)


def test_modules_parameters_and_buffers_keep_their_identity():
    model = torch.nn.Sequential(_deconv(), torch.nn.BatchNorm2d(3, dtype=F64),
                                parametrizations.spectral_norm(_deconv()))
    modules = {name: id(m) for name, m in model.named_modules()}
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tritondeconv.convert(model)
    assert {name: id(m) for name, m in model.named_modules()} == modules
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert after.keys() == tensors.keys() and all(after[name] is t for name, t in tensors.items())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_training_mode_is_kept(training):
    model = torch.nn.Sequential(_deconv(), torch.nn.Sequential(_deconv(), torch.nn.ReLU())).train(training)
    model[1][0].train(not training)  # one module in the other mode
    modes = [m.training for m in model.modules()]
    tritondeconv.convert(model)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("norm", [None, "parametrizations.weight_norm"])
def test_state_dict_keys_unchanged_and_loadable_both_ways(device, norm):
    seed = fresh_seed()
    wrap = parametrizations.weight_norm if norm else (lambda m: m)

    def make():
        return torch.nn.Sequential(_deconv(device), torch.nn.ReLU(), wrap(_deconv(device, out_channels=2)))

    model = make()
    keys = list(model.state_dict())
    tritondeconv.convert(model)
    assert list(model.state_dict()) == keys
    theirs = make()
    model.load_state_dict(theirs.state_dict())  # PyTorch's checkpoint into ours
    _assert_same_function(model, theirs, _input(device), seed)
    back = make()
    back.load_state_dict(model.state_dict())  # ours into PyTorch's
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_an_optimizer_made_before_converting_still_trains_the_model(device):
    seed = fresh_seed()
    model = torch.nn.Sequential(_deconv(device), torch.nn.Tanh(), _deconv(device, out_channels=2)).eval()
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference)]
    tritondeconv.convert(model)
    x = _input(device)
    with torch.no_grad():
        before = model(x)  # (packs the inference weights)
    for m, optimizer in zip((model, reference), optimizers):
        m(x).square().sum().backward()
        optimizer.step()
    with torch.no_grad():
        after, expected = model(x), reference(x)
    assert relative_error(after, before) > 1e-3, "the step did not reach the converted model"
    assert relative_error(after, expected) <= TOLERANCE, f"seed {seed}"


# ---------------------------------------------------------------- hooks


HOOKS = {
    "forward_pre": lambda m, hook: m.register_forward_pre_hook(hook),
    "forward": lambda m, hook: m.register_forward_hook(hook),
    "forward_with_kwargs": lambda m, hook: m.register_forward_hook(hook, with_kwargs=True),
    "backward_pre": lambda m, hook: m.register_full_backward_pre_hook(hook),
    "backward": lambda m, hook: m.register_full_backward_hook(hook),
    "state_dict_pre": lambda m, hook: m.register_state_dict_pre_hook(hook),
    "state_dict": lambda m, hook: m.register_state_dict_post_hook(hook),
    "load_state_dict_pre": lambda m, hook: m.register_load_state_dict_pre_hook(hook),
    "load_state_dict_post": lambda m, hook: m.register_load_state_dict_post_hook(hook),
}


@pytest.mark.parametrize("kind", HOOKS)
def test_hooks_survive_and_fire(device, kind):
    fresh_seed()
    module = _deconv(device)
    calls = []
    HOOKS[kind](module, lambda *args: calls.append(kind))
    tritondeconv.convert(module)
    module(_input(device).requires_grad_()).sum().backward()
    module.load_state_dict(module.state_dict())
    assert calls == [kind]


def test_hooks_that_change_values_still_change_them(device):
    seed = fresh_seed()
    module = _deconv(device)
    module.register_forward_pre_hook(lambda m, args: (2 * args[0],))
    module.register_forward_hook(lambda m, args, out: out.tanh())
    reference = copy.deepcopy(module)
    tritondeconv.convert(module)
    _assert_same_function(module, reference, _input(device), seed)


# ---------------------------------------------------------------- normalisations and parametrizations

NORMS = {
    "weight_norm": torch.nn.utils.weight_norm,  # old-style (HiFi-GAN): a forward pre-hook
    "spectral_norm": torch.nn.utils.spectral_norm,  # old-style: a pre-hook, state-dict hooks, buffers
    "parametrizations.weight_norm": parametrizations.weight_norm,  # a parametrized class
    "parametrizations.spectral_norm": parametrizations.spectral_norm,
}
REMOVALS = {
    "weight_norm": torch.nn.utils.remove_weight_norm,
    "spectral_norm": torch.nn.utils.remove_spectral_norm,
    "parametrizations.weight_norm": lambda m: parametrize.remove_parametrizations(m, "weight"),
    "parametrizations.spectral_norm": lambda m: parametrize.remove_parametrizations(m, "weight"),
}


def _normalised_pair(device, norm, training):
    """Two normalised layers with the same state (the power iteration's vectors included)."""
    module, reference = (NORMS[norm](_deconv(device)).train(training) for _ in range(2))
    reference.load_state_dict(module.state_dict())
    return module, reference


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", NORMS)
def test_normalised_layers_convert_and_match(device, norm, training):
    seed = fresh_seed()
    module, reference = _normalised_pair(device, norm, training)
    keys = list(module.state_dict())
    assert tritondeconv.convert(module, return_count=True) == (module, 1)
    assert isinstance(module, OURS[2]) and parametrize.type_before_parametrizations(module) is OURS[2]
    assert parametrize.is_parametrized(module) == norm.startswith("parametrizations.")
    assert list(module.state_dict()) == keys
    _assert_same_function(module, reference, _input(device), seed)
    _assert_same_function(module, reference, _input(device), seed)  # (the power iteration stepped alike)


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("norm", NORMS)
def test_normalisation_removed_after_converting_leaves_our_module(device, norm):
    seed = fresh_seed()
    module, reference = _normalised_pair(device, norm, training=False)
    tritondeconv.convert(module)
    REMOVALS[norm](module)
    REMOVALS[norm](reference)
    assert type(module) is OURS[2]
    assert list(module.state_dict()) == list(reference.state_dict())
    _assert_same_function(module, reference, _input(device), seed)


def test_parametrized_copies_keep_sharing_one_class(device):
    seed = fresh_seed()
    first = parametrizations.weight_norm(_deconv(device))
    second = copy.deepcopy(first)  # a copy shares its parametrized class
    model = torch.nn.Sequential(first, torch.nn.Tanh(), second)
    reference = copy.deepcopy(model)
    assert tritondeconv.convert(model, return_count=True) == (model, 2)
    assert type(first) is type(second) and isinstance(first, OURS[2])
    _assert_same_function(model, reference, _input(device), seed)


# ---------------------------------------------------------------- what it leaves


class _Subclass(torch.nn.ConvTranspose2d):
    """A user's subclass with a forward of its own."""

    def forward(self, input, output_size=None):
        return 2 * super().forward(input, output_size)


LEFT = {
    "lazy": (lambda: torch.nn.LazyConvTranspose2d(3, 3), "its parameters are not initialised yet"),
    "subclass": (lambda: _Subclass(3, 3, 3), "_Subclass is a subclass with behaviour of its own"),
    "parametrized-subclass": (lambda: parametrizations.weight_norm(_Subclass(3, 3, 3)),
                              "_Subclass is a subclass with behaviour of its own"),
    "complex": (lambda: torch.nn.ConvTranspose2d(3, 3, 3, dtype=torch.complex128),
                "its dtype torch.complex128 is not supported"),
}


@pytest.mark.parametrize("case", LEFT)
def test_what_it_cannot_take_is_left_and_named_in_one_warning(case):
    make, why = LEFT[case]
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 3, 3), make())
    left = model[1]
    cls = type(left)
    with pytest.warns(UserWarning, match=rf"left 1 module\(s\) unchanged: 1 \({re.escape(why)}\)$"):
        assert tritondeconv.convert(model, return_count=True) == (model, 1)
    assert model[1] is left and type(left) is cls and type(model[0]) is OURS[2]


def test_a_bare_module_left_is_named_as_the_model():
    with pytest.warns(UserWarning, match=r"unchanged: the model itself \(_Subclass is a subclass"):
        tritondeconv.convert(_Subclass(3, 3, 3))


def test_a_lazy_module_is_converted_once_initialised(device):
    seed = fresh_seed()
    model = torch.nn.Sequential(torch.nn.LazyConvTranspose2d(2, 3, stride=2, device=device, dtype=F64))
    x = _input(device)
    model(x)  # initialises it (PyTorch's forward)
    reference = copy.deepcopy(model)
    assert tritondeconv.convert(model, return_count=True) == (model, 1)
    _assert_same_function(model, reference, x, seed)


# ---------------------------------------------------------------- fold_upsample


def test_fold_upsample_keeps_the_convolution_module(device):
    seed = fresh_seed()
    conv = torch.nn.Conv2d(3, 2, 3, padding=1, device=device, dtype=F64)
    model = torch.nn.Sequential(_deconv(device), torch.nn.Upsample(scale_factor=2), conv)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert tritondeconv.convert(model, fold_upsample=True, return_count=True) == (model, 2)
    assert model[2] is conv and type(conv) is tritondeconv.nn.UpsampleConv2d and conv.scale_factor == (2, 2)
    assert type(model[0]) is OURS[2] and isinstance(model[1], torch.nn.Identity)
    assert list(model.state_dict()) == keys
    _assert_same_function(model, reference, _input(device), seed)


def test_fold_upsample_in_a_shared_block_folds_it_once(device):
    seed = fresh_seed()
    block = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2),
                                torch.nn.Conv2d(3, 3, 3, padding=1, device=device, dtype=F64))
    model = torch.nn.Sequential(block, torch.nn.Tanh(), block)
    reference = copy.deepcopy(model)
    assert tritondeconv.convert(model, fold_upsample=True, return_count=True) == (model, 1)
    assert model[0] is block and model[2] is block and type(block[1]) is tritondeconv.nn.UpsampleConv2d
    _assert_same_function(model, reference, _input(device), seed)


def test_fold_upsample_leaves_a_convolution_used_elsewhere():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), conv, torch.nn.ReLU(), conv)
    with pytest.warns(UserWarning, match=r"unchanged: 0\+1 \(the convolution is also used elsewhere"):
        assert tritondeconv.convert(model, fold_upsample=True, return_count=True) == (model, 0)
    assert isinstance(model[0], torch.nn.Upsample) and type(conv) is torch.nn.Conv2d


@pytest.mark.parametrize("kind", ["forward_pre", "forward", "backward"])
@pytest.mark.parametrize("hooked", [0, 1], ids=["upsampler", "convolution"])
def test_fold_upsample_leaves_a_pair_with_hooks(hooked, kind):
    model = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(3, 3, 3, padding=1))
    HOOKS[kind](model[hooked], lambda *args: None)
    with pytest.warns(UserWarning, match=r"unchanged: 0\+1 \(the upsampler or the convolution has hooks"):
        assert tritondeconv.convert(model, fold_upsample=True, return_count=True) == (model, 0)
    assert isinstance(model[0], torch.nn.Upsample) and type(model[1]) is torch.nn.Conv2d


# ---------------------------------------------------------------- folding in forward code

class _UpBlock(torch.nn.Module):
    """An upsampling block as diffusers' SD-VAE writes it: interpolate in forward, then a conv."""

    def __init__(self, channels, functional=True, mode="nearest", reuse=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.upsample = None if functional else torch.nn.Upsample(scale_factor=2, mode=mode)
        self.mode, self.reuse = mode, reuse

    def forward(self, x):
        up = F.interpolate(x, scale_factor=2.0, mode=self.mode) if self.upsample is None else self.upsample(x)
        out = self.conv(up)
        return out + up if self.reuse else out


class _Decoder(torch.nn.Module):
    def __init__(self, **block):
        super().__init__()
        self.block = _UpBlock(4, **block)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return self.act(self.block(x))


@pytest.mark.parametrize("functional", [True, False], ids=["F.interpolate", "nn.Upsample"])
def test_fold_upsample_folds_forward_code_too(device, functional):
    seed = fresh_seed()
    model = _Decoder(functional=functional).to(device, torch.float64)
    x = torch.randn(2, 4, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    ref = model(x)
    (ref_gx,) = torch.autograd.grad(ref.sum(), x)
    folded, count = tritondeconv.convert(model, fold_upsample=True, return_count=True)
    assert count == 1 and isinstance(folded, torch.fx.GraphModule)
    assert isinstance(folded.block.conv, tritondeconv.nn.UpsampleConv2d)
    assert folded.block.conv.weight is model.block.conv.weight  # parameters shared: optimizers keep working
    assert list(folded.state_dict()) == list(model.state_dict())
    with observe_launches() as launches:
        out = folded(x)
        (gx,) = torch.autograd.grad(out.sum(), x)
    assert "interpolate" not in folded.code and "upsample" not in folded.code
    assert [launch.kernel for launch in launches][0] == "phase_gemm"
    assert_close(out, ref.detach(), "float64", seed)
    assert_close(gx, ref_gx, "float64", seed)
    assert torch.equal(model(x), ref)  # the model passed in still works, unfolded


@pytest.mark.no_kernel("nothing is folded: the checks are on what convert leaves")
@pytest.mark.parametrize("block, reason", [
    (dict(mode="bilinear"), None),  # not a nearest upsampling: not a candidate at all
    (dict(reuse=True), "the upsampled tensor is used elsewhere too"),
])
def test_fold_upsample_leaves_and_names_what_it_cannot_fold(device, block, reason):
    model = _Decoder(**block).to(device, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same, count = tritondeconv.convert(model, fold_upsample=True, return_count=True)
    assert same is model and count == 0
    messages = " ".join(str(w.message) for w in caught)
    assert (reason in messages) if reason else not messages


def test_fold_upsample_leaves_an_untraceable_forward_with_a_warning():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x)

    model = DataDependent()
    with pytest.warns(UserWarning, match="not traceable by torch.fx"):
        assert tritondeconv.convert(model, fold_upsample=True) is model


def test_upsample_conv2d_from_modules_shares_parameters_and_refuses_what_it_cannot_fold():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    folded = tritondeconv.nn.UpsampleConv2d.from_modules(torch.nn.Upsample(scale_factor=2), conv)
    assert folded.weight is conv.weight and folded.bias is conv.bias and folded.scale_factor == (2, 2)
    assert conv.__class__ is torch.nn.Conv2d  # the original is untouched
    with pytest.raises(ValueError, match="not stride 1"):
        tritondeconv.nn.UpsampleConv2d.from_modules(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(3, 4, 3, 2))
    with pytest.raises(ValueError, match="mode='nearest'"):
        tritondeconv.nn.UpsampleConv2d.from_modules(torch.nn.Upsample(scale_factor=2, mode="bilinear"), conv)


# ---------------------------------------------------------------- fuse=True (inference)

ACTIVATION_MODULES = [torch.nn.ReLU(), torch.nn.LeakyReLU(0.2), torch.nn.SiLU(), torch.nn.GELU(), torch.nn.Tanh(),
                      torch.nn.Sigmoid()]
BATCH_NORMS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def _batch_norm(rank, channels, affine=True):
    """A batch norm in eval mode with running statistics and affine parameters far from
    their initial values (so that a fold that ignored one of them would show)."""
    bn = BATCH_NORMS[rank](channels, affine=affine, dtype=F64).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


def _decoder_blocks(rank, first_activation):
    """Three decoder blocks: deconv (2 groups) + BN + activation, deconv + BN without
    affine parameters, deconv + SiLU; 16 channels so that the tensor-core tiles run."""
    return torch.nn.Sequential(
        _deconv(rank=rank, in_channels=16, out_channels=16, kernel_size=4, groups=2),
        _batch_norm(rank, 16), first_activation,
        _deconv(rank=rank, in_channels=16, out_channels=16),
        _batch_norm(rank, 16, affine=False),
        _deconv(rank=rank, in_channels=16, out_channels=4, kernel_size=2, padding=0), torch.nn.SiLU(),
    ).eval()


@pytest.mark.parametrize("rank, kind, dtype, activation", [
    *((2, "channels_last", torch.float64, module) for module in ACTIVATION_MODULES),
    (1, "nchw", torch.float64, torch.nn.ReLU()), (2, "nchw", torch.float64, torch.nn.LeakyReLU(0.2)),
    (2, "channels_last", torch.float32, torch.nn.SiLU()), (3, "channels_last", torch.float64, torch.nn.Tanh()),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else str(v).removeprefix("torch."))
def test_fuse_folds_batch_norms_and_activations_into_one_kernel_per_block(device, rank, kind, dtype, activation):
    seed = fresh_seed()
    model = _decoder_blocks(rank, activation).to(device)
    reference = copy.deepcopy(model)
    x = layout(torch.randn(1, 16, *(3 if rank < 3 else 2,) * rank, device=device, dtype=F64), kind)
    expected = reference(x)
    with torch.no_grad():  # (PyTorch's own model in the dtype: three convolutions round in turn)
        twin = copy.deepcopy(reference).to(dtype)(x.to(dtype))
    fused, count = tritondeconv.convert(model.to(dtype), fuse=True, return_count=True)
    assert fused is model and count == 3 + 3  # three converted, three blocks fused
    assert [type(m).__name__ for m in fused] == [OURS[rank].__name__, "Identity", "Identity", OURS[rank].__name__,
                                                 "Identity", OURS[rank].__name__, "Identity"]
    with torch.no_grad(), observe_launches() as launches:
        out = fused(x.to(dtype))
    assert len(launches) == 3  # one kernel per block
    assert_close(out, expected, computed_as(dtype, device), seed, twin)


@pytest.mark.no_kernel("nothing is fused: the checks are on what convert leaves")
def test_fuse_leaves_a_model_in_training_mode_unfused_with_a_warning(device):
    model = _decoder_blocks(2, torch.nn.ReLU()).to(device).train()
    with pytest.warns(UserWarning, match="training mode: call model.eval"):
        _, count = tritondeconv.convert(model, fuse=True, return_count=True)
    assert count == 3 and isinstance(model[1], torch.nn.BatchNorm2d) and isinstance(model[2], torch.nn.ReLU)


@pytest.mark.parametrize("case, reason", [
    ("batch norm training", "the batch norm is in training mode"),
    ("no running statistics", "keeps no running statistics"),
    ("hook", "has hooks"),
    ("activation already", "already applies an activation"),
    ("shared", "also used elsewhere"),
])
def test_fuse_leaves_and_names_what_it_cannot_fuse(case, reason):
    block = _decoder_blocks(2, torch.nn.ReLU())
    model = torch.nn.ModuleList([block, block[0]]).eval() if case == "shared" else block
    if case == "batch norm training":
        block[1].train()
    elif case == "no running statistics":
        block[1] = torch.nn.BatchNorm2d(16, track_running_stats=False, dtype=F64).eval()
    elif case == "hook":
        block[2].register_forward_hook(lambda module, args, out: None)
    elif case == "activation already":
        tritondeconv.convert(block)
        block[0].activation = "tanh"
    before = [type(m) for m in block][1:3]
    with pytest.warns(UserWarning, match=reason):
        tritondeconv.convert(model, fuse=True)
    assert [type(m) for m in block][1:3] == before  # the batch norm and the activation stay


def test_fuse_keeps_an_approximate_gelu_as_a_module():
    """The epilogue's GELU is the exact one: a tanh-approximated GELU stays a module (the
    batch norm before it is still folded)."""
    model = _decoder_blocks(2, torch.nn.GELU(approximate="tanh"))
    tritondeconv.convert(model, fuse=True)
    assert isinstance(model[1], torch.nn.Identity) and isinstance(model[2], torch.nn.GELU)
    assert model[0].activation is None


class _NormalisedUpBlock(torch.nn.Module):
    """A decoder block written as forward code: deconv, batch norm, activation, then a
    skip connection (``reuse``: the batch norm's output is used twice, so the
    activation cannot fold into the convolution; the batch norm still can)."""

    def __init__(self, reuse=False):
        super().__init__()
        self.up = _deconv(in_channels=16, out_channels=16, kernel_size=4)
        self.bn = _batch_norm(2, 16)
        self.act = torch.nn.LeakyReLU(0.1)
        self.reuse = reuse

    def forward(self, x, skip):
        y = self.bn(self.up(x))
        return torch.cat([self.act(y) + y if self.reuse else self.act(y), skip], 1)


def test_fuse_folds_forward_code_too_and_leaves_the_original_model_working(device):
    seed = fresh_seed()
    model = _NormalisedUpBlock().to(device).eval()
    x = torch.randn(1, 16, 3, 3, device=device, dtype=F64)
    skip = torch.randn(1, 2, 6, 6, device=device, dtype=F64)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x, skip)
        fused, count = tritondeconv.convert(model, fuse=True, return_count=True)
        assert count == 1 + 2 and isinstance(fused, torch.fx.GraphModule)  # converted, fused, concatenating
        assert type(fused.up) is tritondeconv.nn.ConcatUpsample2d
        assert fused.up.activation == "leaky_relu" and fused.up.negative_slope == 0.1
        assert "bn" not in fused.code and "act" not in fused.code
        with observe_launches() as launches:
            out = fused(x, skip)
        assert len(launches) == 1
        assert_close(out, expected, "float64", seed)
        assert fused.up.weight is not model.up.weight  # the folded parameters are the fused model's own
        assert_close(model(x, skip), expected, "float64", seed)  # the model passed in still computes as before


@pytest.mark.no_kernel("nothing runs: the check is on what convert folds")
def test_fuse_in_forward_code_folds_only_what_alone_uses_a_value(device):
    model = _NormalisedUpBlock(reuse=True).to(device).eval()
    fused = tritondeconv.convert(model, fuse=True)
    assert fused.up.activation is None and "act" in fused.code and "bn" not in fused.code


@pytest.mark.parametrize("options", [dict(fuse=True), dict(fold_upsample=True)], ids=["fuse", "fold_upsample"])
def test_a_single_layer_is_not_traced(options):
    """A bare layer has no forward code of its own to fold: no tracing, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(tritondeconv.convert(_deconv().eval(), **options)) is OURS[2]
        assert type(tritondeconv.convert(torch.nn.Conv2d(2, 2, 3).eval(), **options)) is torch.nn.Conv2d
