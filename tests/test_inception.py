"""Parity of the Flax FID InceptionV3 with pytorch-fid's network at random initialisation.

The reference is `pytorch_fid.inception.InceptionV3` itself (its FID blocks, wrapper, resize
and normalisation). pytorch-fid builds on torchvision's Inception3 classes; where torchvision
cannot be imported (PyPI's torchvision wheels fail beside the CPU torch 2.13.0 pinned here),
a stand-in `torchvision.models.inception` built from torch primitives after the published
architecture (the layer names and shapes of pytorch-fid's weights file) is installed first.
Install the reference with `pip install --no-deps pytorch-fid==0.3.0` (its declared torch and
torchvision requirements would pull a CUDA torch 2.14.1); without it the parity test is skipped.
"""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn_t = torch.nn
F_t = torch.nn.functional

from muse_jax.evaluation import inception  # noqa: E402


def _stand_in_torchvision() -> None:
    """Registers a minimal `torchvision` with the Inception3 pieces pytorch-fid subclasses."""

    class BasicConv2d(nn_t.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn_t.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn_t.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F_t.relu(self.bn(self.conv(x)))

    def _cat(branches, x):
        return torch.cat([b(x) for b in branches], 1)

    class InceptionA(nn_t.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    class InceptionB(nn_t.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            a = self.branch3x3(x)
            b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([a, b, F_t.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionC(nn_t.Module):
        def __init__(self, cin, channels_7x7):
            super().__init__()
            c7 = channels_7x7
            self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    class InceptionD(nn_t.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            a = self.branch3x3_2(self.branch3x3_1(x))
            b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([a, b, F_t.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionE(nn_t.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    class Inception3(nn_t.Module):
        def __init__(self, num_classes=1000, aux_logits=True, init_weights=None, weights=None):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
            self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048)
            self.fc = nn_t.Linear(2048, num_classes)

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.28.0"
    tv.models = types.ModuleType("torchvision.models")
    tv.models.inception = types.ModuleType("torchvision.models.inception")
    for cls in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, Inception3):
        setattr(tv.models.inception, cls.__name__, cls)
    tv.models.inception_v3 = lambda **kw: Inception3(**kw)
    sys.modules.update({"torchvision": tv, "torchvision.models": tv.models,
                        "torchvision.models.inception": tv.models.inception})


def _reference_network(monkeypatch):
    """pytorch-fid's InceptionV3 (pool3 block) with random weights and calibrated BatchNorm."""
    # The stand-in torchvision and the pytorch_fid.inception built on it leave sys.modules when
    # the test ends, so no other test sees them.
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision" or m == "pytorch_fid.inception"]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("torchvision", "torchvision.models", "torchvision.models.inception", "pytorch_fid.inception"):
        monkeypatch.setitem(sys.modules, name, None)  # recorded as absent: removed again at teardown
        del sys.modules[name]
    try:
        import torchvision.models.inception  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or fails to import beside this torch
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        _stand_in_torchvision()
    import pytorch_fid.inception as fid_inception

    torch.manual_seed(0)
    with monkeypatch.context() as m:  # random initialisation instead of the weight download
        m.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    bns = [mod for mod in net.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = 1.0  # one training pass sets the running statistics to the batch's
        net.train()
        net(torch.rand(2, 3, 64, 64))
    net.eval()
    return net


def test_resize_matches_torch_interpolate():
    rng = np.random.default_rng(0)
    for shape in [(2, 3, 37, 64), (1, 3, 400, 320)]:  # upsampling and downsampling
        x = rng.random(shape)
        want = F_t.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False).numpy()
        with jax.enable_x64(True):
            got = np.asarray(inception.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (299, 299)))
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=1e-12)
        x32 = x.astype(np.float32)  # float32: equal up to the rounding of the index arithmetic
        want = F_t.interpolate(torch.from_numpy(x32), size=(299, 299), mode="bilinear", align_corners=False).numpy()
        got = np.asarray(inception.resize_bilinear(jnp.asarray(x32.transpose(0, 2, 3, 1)), (299, 299)))
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=3e-5)


def test_pool3_features_match_pytorch_fid(monkeypatch, tmp_path):
    pytest.importorskip("pytorch_fid")
    net = _reference_network(monkeypatch)
    variables = inception.load_torch_state_dict(net.state_dict())
    assert inception.parameter_count(variables) == sum(p.numel() for p in net.parameters())
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():  # float64 reference: free of float32 rounding on either side
        want = net.double()(torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0)[0][:, :, 0, 0].numpy()
    assert want.std() > 0.1  # calibrated BatchNorm: the features are not degenerate
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        got64 = np.asarray(inception.InceptionV3().apply(v64, jnp.asarray(images, jnp.float64) / 255.0))
    err64 = np.abs(got64 - want).max()
    # The float32 path that FID uses, against PyTorch's float32 forward. This random network is
    # chaotic (1e-7 of input noise moves its float64 features by ~1e-4), so float32 rounding
    # alone, on either side, moves the features by ~1e-4..1e-3.
    with torch.no_grad():
        want32 = net.float()(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0].numpy()
    got32 = inception.inception_features(images, variables, batch_size=2)
    err32 = np.abs(got32 - want32).max()
    print(f"pool3 max|jax - torch|: float64 {err64:.2e}, float32 {err32:.2e} (max |feature| {np.abs(want).max():.2f})")
    assert got32.shape == (2, inception.FEATURE_DIM)
    assert err64 <= 1e-4
    assert err32 <= 1e-3
    # The user-supplied file: a PyTorch state dict, or the torch-free .npz converted from it.
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    inception.save_npz(net.state_dict(), str(tmp_path / "inception.npz"))
    for name in ("inception.pth", "inception.npz"):
        loaded = inception.load_inception(str(tmp_path / name))
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, loaded, variables))


def test_parameter_count_matches_the_published_inception_v3():
    """torchvision documents 27,161,264 parameters for InceptionV3 with its auxiliary head
    (conv 768->128 1x1 + BN, conv 128->768 5x5 + BN, fc 768->1000) and fc 2048->1000; the FID
    network is the same trunk without them."""
    aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
    fc = 2048 * 1000 + 1000
    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    assert inception.parameter_count(shapes) == 27_161_264 - aux - fc


def test_state_dict_errors_name_the_problem():
    with pytest.raises(ValueError, match="unexpected entry"):
        inception.load_torch_state_dict({"Mixed_5b.branch1x1.linear.weight": np.zeros((1,))})
    with pytest.raises(ValueError, match="missing"):
        inception.load_torch_state_dict({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3))})
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        inception.load_inception("/nonexistent/pt_inception.pth")


def test_clean_protocol_feeds_the_network_what_clean_fid_does():
    """clean-fid's own code (`pip install --no-deps clean-fid==0.1.35`: its resizer, and its
    InceptionV3 wrapper's forward with the network replaced by a recorder) gives the network input
    of the "clean" protocol bit for bit: the same resize, then (x - 128) / 128."""
    pytest.importorskip("cleanfid")
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    class Recorder(nn_t.Module):
        def forward(self, x):
            self.input = x
            return torch.zeros(len(x), 2048)

    wrapper = InceptionV3W.__new__(InceptionV3W)  # without the weights download of __init__
    nn_t.Module.__init__(wrapper)
    wrapper.resize_inside, wrapper.layers = False, Recorder()
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    resize = build_resizer("clean")
    # clean-fid's dataset turns the float32 [H, W, C] resize into a [C, H, W] tensor (ToTensor, no scaling)
    wrapper(torch.from_numpy(np.stack([resize(x) for x in images]).transpose(0, 3, 1, 2).copy()))
    want = wrapper.layers.input.numpy().transpose(0, 2, 3, 1)

    got = inception.clean_input(images)
    assert got.dtype == np.float32 and want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert got.min() >= -1.0 and got.max() < 1.0 and not np.allclose(got, inception.clean_resize(images) / 127.5 - 1)

    # and the features of the "clean" protocol are the network's on exactly that input
    variables = inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    net = inception.InceptionV3(resize_input=False, normalize_input=False)
    np.testing.assert_allclose(inception.make_feature_fn(variables, "clean")(images[:1]),
                               jax.jit(net.apply)(variables, want[:1]), rtol=1e-6, atol=1e-6)
