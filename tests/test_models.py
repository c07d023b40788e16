import pytest

from anyms_core.models import load_pipeline, load_sdxl_with_ip_adapter


def test_local_sdxl_folders_say_what_is_missing(tmp_path):
    base, adapter = tmp_path / "sdxl", tmp_path / "ip"
    base.mkdir()
    (adapter / "sdxl_models").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"lacks \['model_index.json', 'unet/config.json'\]"):
        load_sdxl_with_ip_adapter(base, adapter, device="cpu")
    (base / "unet").mkdir()
    (base / "model_index.json").write_text("{}")
    (base / "unet" / "config.json").write_text("{}")
    # the ViT-bigG encoder of the base adapter lives under sdxl_models/, the ViT-H one under models/
    with pytest.raises(ValueError, match="sdxl_models/image_encoder/config.json"):
        load_sdxl_with_ip_adapter(base, adapter, adapter="base", device="cpu")
    with pytest.raises(ValueError, match="'models/image_encoder/config.json'"):
        load_sdxl_with_ip_adapter(base, adapter, adapter="plus-vit-h", device="cpu")


def test_unknown_models_and_options():
    with pytest.raises(ValueError, match="Unknown model"):
        load_pipeline("sd3")
    with pytest.raises(ValueError, match="does not take"):
        load_pipeline({"name": "tiny-sdxl", "steps": 3})
    with pytest.raises(ValueError, match="Unknown SDXL IP-Adapter"):
        load_sdxl_with_ip_adapter(adapter="faceid", device="cpu")


def test_tiny_models_load_by_name():
    pipe = load_pipeline({"name": "tiny-sd15", "ip_adapter": "plus"})
    assert pipe.anyms_model_name == "tiny-sd15"
