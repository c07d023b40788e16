import pytest

from anyms_core.models import (
    SD15_IP_ADAPTERS, SDXL_IP_ADAPTERS, check_model_spec, hf_download_command, load_pipeline, load_sdxl_with_ip_adapter,
)


def test_local_sdxl_folders_say_what_is_missing(tmp_path):
    base, adapter = tmp_path / "sdxl", tmp_path / "ip"
    base.mkdir()
    (adapter / "sdxl_models").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"lacks \['model_index.json', 'unet/config.json', 'unet/diffusion_pytorch_model.safetensors'\]"):
        load_sdxl_with_ip_adapter(base, adapter, device="cpu")
    (base / "unet").mkdir()
    (base / "model_index.json").write_text("{}")
    (base / "unet" / "config.json").write_text("{}")
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_text("")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.fp16.safetensors.*--include \"\*/\*.fp16.safetensors\""):
        load_sdxl_with_ip_adapter(base, adapter, device="cpu", variant="fp16")
    # the ViT-bigG encoder of the base adapter lives under sdxl_models/, the ViT-H one under models/
    with pytest.raises(ValueError, match='sdxl_models/image_encoder/config.json.*--include "sdxl_models/image_encoder/\\*"'):
        load_sdxl_with_ip_adapter(base, adapter, adapter="base", device="cpu")
    with pytest.raises(ValueError, match="'models/image_encoder/config.json'"):
        load_sdxl_with_ip_adapter(base, adapter, adapter="plus", device="cpu")


def test_unknown_models_and_options():
    with pytest.raises(ValueError, match="Unknown model"):
        load_pipeline("sd3")
    with pytest.raises(ValueError, match="does not take"):
        load_pipeline({"name": "tiny-sdxl", "steps": 3})
    with pytest.raises(ValueError, match="Unknown SDXL IP-Adapter"):
        load_sdxl_with_ip_adapter(adapter="faceid", device="cpu")
    with pytest.raises(ValueError, match="Unknown SD15 IP-Adapter"):
        check_model_spec({"name": "sd15", "adapter": "faceid"})
    with pytest.raises(ValueError, match="a name"):
        check_model_spec(3)
    assert check_model_spec({"name": "sd15", "adapter": "plus-face", "variant": "fp16"}) == (
        "sd15", {"adapter": "plus-face", "variant": "fp16"})


def test_tiny_models_load_by_name():
    pipe = load_pipeline({"name": "tiny-sd15", "ip_adapter": "plus"})
    assert pipe.anyms_model_name == "tiny-sd15"


@pytest.mark.parametrize("weights", [*SDXL_IP_ADAPTERS.values(), *SD15_IP_ADAPTERS.values()])
def test_download_commands_parse_with_the_hf_cli_and_include_the_image_encoder(weights):
    """Each pattern has its own --include and no bare file name (hf ignores --include when given file names)."""
    import shlex

    typer = pytest.importorskip("typer")
    from huggingface_hub.cli.download import download  # the function behind `hf download`

    command = hf_download_command("h94/IP-Adapter", weights.files, "/tmp/ip")
    argv = shlex.split(command)
    assert argv[:2] == ["hf", "download"]
    app = typer.Typer()
    app.command()(download)
    params = typer.main.get_command(app).make_context("download", argv[2:]).params
    assert params["repo_id"] == "h94/IP-Adapter" and not params["filenames"]
    assert params["include"] == [f"{weights.subfolder}/{weights.weight_name}", f"{weights.image_encoder_folder}/*"]
    assert params["local_dir"] == "/tmp/ip"
