"""Export round trips, each read back by an implementation towerlab did not write: transformers' CLIPModel, or
SiglipModel for SigLIP-shaped towers (and its tokenizer and image processor) for --format hf, OpenCLIP's own CLIP class for --format open_clip; embeddings equal
towerlab's within 1e-5 in fp32. Then the refusals, one line each, and the command on a checkpoint directory."""

from __future__ import annotations

import json

import pytest
import torch

from towerlab.cli import main
from towerlab.config import ConfigError, to_yaml
from towerlab.data.tokenizer import HFTokenizer, Tokenizer
from towerlab.models import ContrastiveModel
from towerlab.models import adapters
from towerlab.train.checkpoint import CKPT_TAG, RECIPE_FILE
from towerlab.train.export import EXPORT_FILE, export_model
from towerlab.train.module import build_module
from towerlab.train.recipe import load_recipe

from clip_testing import MEAN, SIGLIP_CONTEXT, features, open_clip_model, save_clip, save_siglip

TEXTS = ["a photo of the digit seven", "three", "the the digit of a photo x"]


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    save_clip(path)
    return path


def trained(recipe) -> ContrastiveModel:
    """The recipe's model with every parameter moved (as training would), so an export that wrote the imported
    weights instead of the model's own would show."""
    torch.manual_seed(3)
    model = ContrastiveModel(recipe.model, temperature_init=recipe.loss.temperature_init,
                             bias_init=recipe.loss.bias_init)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images(recipe, n: int = 3) -> torch.Tensor:
    s = recipe.model.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(5))


def test_hf_export_loads_in_transformers_with_equal_embeddings(clip_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    recipe = load_recipe(None, [f"model.pretrained=hf:{clip_dir}"])
    model = trained(recipe)
    out = export_model(model, recipe, "hf", tmp_path / "hf", source={"step": 2})
    assert json.loads((out / EXPORT_FILE).read_text())["format"] == "hf"

    hf = CLIPModel.from_pretrained(out).eval()
    tokens = torch.from_numpy(AutoTokenizer.from_pretrained(out)(TEXTS, padding="max_length", max_length=10,
                                                                 truncation=True, return_tensors="np")["input_ids"])
    ours = HFTokenizer(f"hf:{clip_dir}", recipe.model.text.context_length).encode_batch(TEXTS)
    assert tokens.numpy().tolist() == ours.tolist()  # the exported tokenizer is the run's
    x = images(recipe)
    with torch.no_grad():
        torch.testing.assert_close(features(hf.get_image_features(pixel_values=x)), model.towers["image"](x),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(features(hf.get_text_features(input_ids=tokens)), model.towers["text"](tokens),
                                   atol=1e-5, rtol=0)
    assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item())
    proc = CLIPImageProcessor.from_pretrained(out)
    assert proc.image_mean == pytest.approx(MEAN) and proc.crop_size == {"height": 16, "width": 16}


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
def test_towerlab_towers_map_onto_clipmodel(act):
    """towerlab's own towers (random init, no import) through the hf adapter, with each activation."""
    from transformers import CLIPConfig, CLIPModel

    recipe = load_recipe(None, [f"model.vision.act={act}", f"model.text.act={act}", "model.text.pool=eos",
                                "model.text.eos_id=3"])
    model = trained(recipe)
    hf = CLIPModel(CLIPConfig(**adapters.hf_config_dict(recipe.model))).eval()
    hf.load_state_dict(adapters.to_hf_clip(model.state_dict()), strict=True)
    t = recipe.model.text
    tokens = torch.randint(4, t.vocab_size, (4, t.context_length), generator=torch.Generator().manual_seed(2))
    tokens[:, 5] = 3  # the end-of-text
    x = images(recipe, 4)
    with torch.no_grad():
        torch.testing.assert_close(features(hf.get_image_features(pixel_values=x)), model.towers["image"](x),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(features(hf.get_text_features(input_ids=tokens)), model.towers["text"](tokens),
                                   atol=1e-5, rtol=0)


def _open_clip_round_trip(recipe, tokens: torch.Tensor, out, warnings: list[str]):
    from safetensors.torch import load_file

    model = trained(recipe)
    export_model(model, recipe, "open_clip", out, warn=warnings.append)
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["preprocess_cfg"]["mean"] == pytest.approx(recipe.model.vision.mean)
    sd = load_file(str(out / "open_clip_model.safetensors"))
    with open_clip_model() as oc:
        ref = oc.CLIP(**cfg["model_cfg"]).eval()
        own = ref.state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in own.items()}
        ref.load_state_dict(sd, strict=True)
        x = images(recipe)
        with torch.no_grad():
            torch.testing.assert_close(ref.encode_image(x), model.towers["image"](x), atol=1e-5, rtol=0)
            torch.testing.assert_close(ref.encode_text(tokens), model.towers["text"](tokens), atol=1e-5, rtol=0)
    # and back into towerlab from OpenCLIP's files
    back = load_recipe(None, [f"model.pretrained=open_clip:{out / 'open_clip_config.json'}:"
                              f"{out / 'open_clip_model.safetensors'}"])
    for key in ("embed_dim",):
        assert getattr(back.model, key) == getattr(recipe.model, key)
    assert (back.model.text.pool, back.model.vision.act) == ("eos", recipe.model.vision.act)
    reloaded = ContrastiveModel(back.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.towers["text"](tokens), model.towers["text"](tokens), atol=1e-6,
                                   rtol=0)
    return model


def test_open_clip_round_trip_of_a_word_vocabulary_run(tmp_path):
    recipe = load_recipe(None, ["model.arch=debug"])
    t = recipe.model.text
    tok = Tokenizer(["<pad>", "<unk>", "<eot>", "a", "photo", "of", "the", "digit", "seven", "three"],
                    t.context_length, t.vocab_size)
    warnings: list[str] = []
    _open_clip_round_trip(recipe, torch.from_numpy(tok.encode_batch(TEXTS)), tmp_path / "oc", warnings)
    assert len(warnings) == 1 and "OpenCLIP has no tokenizer" in warnings[0]


def test_open_clip_round_trip_of_an_imported_clip(clip_dir, tmp_path):
    recipe = load_recipe(None, [f"model.pretrained=hf:{clip_dir}"])
    tokens = torch.from_numpy(HFTokenizer(f"hf:{clip_dir}", recipe.model.text.context_length).encode_batch(TEXTS))
    warnings: list[str] = []
    _open_clip_round_trip(recipe, tokens, tmp_path / "oc", warnings)
    assert warnings == [] and (tmp_path / "oc" / "tokenizer.json").is_file()


def test_refusals_are_one_line(tmp_path):
    word = load_recipe(None, [])
    model = ContrastiveModel(word.model)
    cases = [
        (word, "hf", tmp_path / "a", "--format hf: the run's tokenizer is the data's word vocabulary"),
        (load_recipe(None, ["model.vision.act=gelu_tanh", "model.text.act=gelu_tanh"]), "open_clip", tmp_path / "b",
         "act=gelu_tanh: OpenCLIP's CLIP towers have gelu and quick_gelu only"),
        (load_recipe(None, ["model.vision.act=quick_gelu"]), "open_clip", tmp_path / "c",
         "OpenCLIP has one activation for both towers"),
        (word, "onnx", tmp_path / "d", "--format onnx: use one of hf, open_clip"),
    ]
    for recipe, fmt, out, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            export_model(ContrastiveModel(recipe.model), recipe, fmt, out)
        assert "\n" not in str(e.value) and not out.exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not towerlab's")
    with pytest.raises(ConfigError, match="a non-empty directory towerlab did not write"):
        export_model(model, word, "open_clip", foreign, warn=lambda m: None)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # untouched


def checkpoint_dir(recipe, root, step: int, name: str = "checkpoint_000001"):
    """A checkpoint laid out as training writes one (DeepSpeed's ZeRO-0/1/2 module states under ds/, the resolved
    recipe beside them), holding a model whose weights are not the recipe's initial ones."""
    module = build_module(recipe, rank=0, world_size=1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)
    ckpt = root / name
    (ckpt / CKPT_TAG).mkdir(parents=True)
    torch.save({"module": module.state_dict(), "step": step}, ckpt / CKPT_TAG / "mp_rank_00_model_states.pt")
    (ckpt / RECIPE_FILE).write_text(to_yaml(recipe))
    return ckpt, module.model


def test_export_command_on_a_checkpoint(tmp_path, capsys):
    recipe = load_recipe(None, ["train.zero_stage=2"])
    ckpt, model = checkpoint_dir(recipe, tmp_path, step=7)
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--format", "open_clip", "--out", str(out)]) == 0
    marker = json.loads((out / EXPORT_FILE).read_text())
    assert (marker["step"], marker["checkpoint"]) == (7, str(ckpt))
    from safetensors.torch import load_file

    sd = load_file(str(out / "open_clip_model.safetensors"))
    torch.testing.assert_close(sd["visual.proj"], model.towers["image"].proj.detach(), atol=0, rtol=0)
    # again into the same directory: towerlab wrote it, so it is replaced
    assert main(["export", str(ckpt), "--format", "open_clip", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --format hf: the run's tokenizer is the data's word")


def test_export_register_logs_a_logged_model_linked_to_the_run(tmp_path, capsys):
    """--register: the export becomes an MLflow LoggedModel of the run that trained it (its artifacts the exported
    files, its metrics the run's eval metrics at the checkpoint's step) and a registered model version."""
    from mlflow import MlflowClient

    from towerlab.tracking import MlflowRun
    from towerlab.train.checkpoint import RUN_FILE

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run = MlflowRun.start(uri, "exp", "r", params={}, tags={})
    run.log_metrics({"eval/zeroshot/top1": 0.25}, step=3)
    run.log_metrics({"eval/zeroshot/top1": 0.5}, step=7)
    run.log_metrics({"eval/zeroshot/top1": 0.75}, step=9)  # after the checkpoint: not its metric
    run.end()
    recipe = load_recipe(None, [])
    run_dir = tmp_path / "results" / "r"
    checkpoint_dir(recipe, run_dir, step=7)
    (run_dir / RUN_FILE).write_text(json.dumps({"mlflow_run_id": run.run_id}))
    out = tmp_path / "oc"
    assert main(["export", str(run_dir), "--format", "open_clip", "--out", str(out), "--register", "digits",
                 "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp").experiment_id
    models = client.search_logged_models([exp])
    assert len(models) == 1
    m = models[0]
    assert m.source_run_id == run.run_id and "READY" in str(m.status)
    assert {(x.key, x.value, x.step) for x in m.metrics} == {("eval/zeroshot/top1", 0.5, 7)}
    files = {f.path for f in client.list_logged_model_artifacts(m.model_id)}
    assert {"open_clip_model.safetensors", "open_clip_config.json"} <= files
    versions = client.search_model_versions("name='digits'")
    assert [(v.source, v.run_id) for v in versions] == [(f"models:/{m.model_id}", run.run_id)]


def test_log_run_models_logs_the_last_and_the_best_checkpoint(tmp_path):
    from mlflow import MlflowClient

    from towerlab.tracking import MlflowRun
    from towerlab.train.checkpoint import RUN_FILE
    from towerlab.train.export import log_run_models

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run = MlflowRun.start(uri, "exp", "r", params={}, tags={})
    run.log_metrics({"eval/zeroshot/top1": 0.9, "eval/retrieval/recall_at_1_i2t": 0.1}, step=3)
    run.log_metrics({"eval/zeroshot/top1": 0.5, "eval/retrieval/recall_at_1_i2t": 0.2}, step=7)
    run.end()
    recipe = load_recipe(None, [])
    run_dir = tmp_path / "results" / "r"
    checkpoint_dir(recipe, run_dir, step=3, name="checkpoint_000001")
    checkpoint_dir(recipe, run_dir, step=7, name="checkpoint_000002")
    (run_dir / RUN_FILE).write_text(json.dumps({"mlflow_run_id": run.run_id}))
    ids = log_run_models(run_dir, uri, metric="eval/zeroshot/top1", warn=lambda m: None)
    assert set(ids) == {"last", "best"} and ids["last"] != ids["best"]
    client = MlflowClient(uri)
    best, last = client.get_logged_model(ids["best"]), client.get_logged_model(ids["last"])
    assert (best.tags["towerlab.step"], best.tags["towerlab.role"]) == ("3", "best")
    assert (last.tags["towerlab.step"], last.tags["towerlab.role"]) == ("7", "last")
    assert {(x.key, x.value) for x in best.metrics} == {("eval/zeroshot/top1", 0.9),
                                                       ("eval/retrieval/recall_at_1_i2t", 0.1)}
    # the weights are stored once per logged model: one safetensors file each
    for mid in ids.values():
        names = [f.path for f in client.list_logged_model_artifacts(mid)]
        assert names.count("open_clip_model.safetensors") == 1


def test_sigmoid_loss_run_exports_as_clipmodel_with_its_bias(clip_dir, tmp_path):
    from transformers import CLIPModel

    recipe = load_recipe(None, [f"model.pretrained=hf:{clip_dir}", "loss.name=siglip"])
    model = trained(recipe)
    assert model.logit_bias is not None
    warnings: list[str] = []
    out = export_model(model, recipe, "hf", tmp_path / "hf", warn=warnings.append)
    assert len(warnings) == 1 and "exports as transformers' CLIPModel" in warnings[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["towerlab_logit_bias"] == pytest.approx(model.logit_bias.item())
    hf = CLIPModel.from_pretrained(out).eval()
    x = images(recipe)
    with torch.no_grad():
        torch.testing.assert_close(features(hf.get_image_features(pixel_values=x)), model.towers["image"](x),
                                   atol=1e-5, rtol=0)


def test_open_clip_state_dict_made_by_open_clip_imports(tmp_path):
    """An OpenCLIP checkpoint OpenCLIP itself made (its CLIP class, random weights, argmax text pooling,
    quick_gelu) imported with model.pretrained=open_clip:CONFIG:FILE gives OpenCLIP's embeddings."""
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 8, "patch_size": 4},
           "text_cfg": {"context_length": 10, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2}}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    with open_clip_model() as oc:
        ref = oc.CLIP(**cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn_like(p))
        torch.save(ref.state_dict(), tmp_path / "tiny.pt")
        recipe = load_recipe(None, [f"model.pretrained=open_clip:{tmp_path / 'tiny.json'}:{tmp_path / 'tiny.pt'}"])
        assert (recipe.model.text.pool, recipe.model.vision.act, recipe.model.vision.heads) == ("argmax",
                                                                                                  "quick_gelu", 4)
        model = ContrastiveModel(recipe.model).eval()
        tokens = torch.randint(1, 40, (3, 10), generator=torch.Generator().manual_seed(1))
        tokens[:, 6] = 49  # the highest id: OpenAI's end-of-text, where argmax pools
        tokens[:, 7:] = 0
        x = images(recipe)
        with torch.no_grad():
            torch.testing.assert_close(model.towers["image"](x), ref.encode_image(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(model.towers["text"](tokens), ref.encode_text(tokens), atol=1e-5, rtol=0)
        assert model.logit_scale.item() == pytest.approx(ref.logit_scale.item())


def test_best_metric_must_be_one_the_recipe_logs():
    from towerlab.train.driver import best_metric

    with pytest.raises(ConfigError, match=r"tracking.best_metric=eval/zeroshot/top3 is not logged by this recipe"):
        load_recipe(None, ["tracking.best_metric=eval/zeroshot/top3"])
    assert best_metric(load_recipe(None, ["tracking.best_metric=eval/retrieval/recall_at_1_i2t"])) == \
        "eval/retrieval/recall_at_1_i2t"
    assert best_metric(load_recipe(None, [])) == "eval/zeroshot/top1"  # the first zeroshot evaluator's
    assert best_metric(load_recipe(None, ["evals={}"])) is None


SIGLIP_TOWERS = ["model.vision.pool=map", "model.vision.class_token=false", "model.vision.ln_pre=false",
                 "model.vision.patch_bias=true", "model.vision.proj=false", "model.text.causal=false",
                 "model.text.pool=end", "model.text.proj_bias=true"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    save_siglip(path)
    return path


def test_siglip_export_loads_in_transformers_with_equal_embeddings(siglip_dir, tmp_path):
    from transformers import AutoTokenizer, SiglipImageProcessor, SiglipModel

    recipe = load_recipe(None, [f"model.pretrained=hf:{siglip_dir}", "loss.name=siglip"])
    model = trained(recipe)
    warnings: list[str] = []
    out = export_model(model, recipe, "hf", tmp_path / "hf", warn=warnings.append)
    assert warnings == []
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip"
    hf = SiglipModel.from_pretrained(out).eval()
    # the exported tokenizer pads as SigLIP's processor asks (padding="max_length") to the run's context length
    tokens = torch.from_numpy(AutoTokenizer.from_pretrained(out)(TEXTS, padding="max_length",
                                                                 return_tensors="np")["input_ids"])
    ours = HFTokenizer(f"hf:{siglip_dir}", recipe.model.text.context_length).encode_batch(TEXTS)
    assert tokens.shape == (3, SIGLIP_CONTEXT) and tokens.numpy().tolist() == ours.tolist()
    x = images(recipe)
    with torch.no_grad():
        torch.testing.assert_close(features(hf.get_image_features(pixel_values=x)), model.towers["image"](x),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(features(hf.get_text_features(input_ids=tokens)), model.towers["text"](tokens),
                                   atol=1e-5, rtol=0)
    assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item())
    assert hf.logit_bias.item() == pytest.approx(model.logit_bias.item())
    proc = SiglipImageProcessor.from_pretrained(out)
    assert proc.image_mean == pytest.approx(MEAN) and proc.size == {"height": 16, "width": 16}
    # and back: the export imports into towerlab with the same weights, bias included
    back = load_recipe(None, [f"model.pretrained=hf:{out}", "loss.name=siglip"])
    again = ContrastiveModel(back.model, bias_init=back.loss.bias_init)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_towerlab_siglip_towers_map_onto_siglipmodel(act):
    """towerlab's own towers in SigLIP's shape (random init, no import) through the hf adapter."""
    from transformers import SiglipConfig, SiglipModel

    recipe = load_recipe(None, SIGLIP_TOWERS + [f"model.vision.act={act}", f"model.text.act={act}",
                                                "model.vision.width=32", "model.embed_dim=32",
                                                "model.vision.ln_eps=1e-6"])
    model = trained(recipe)
    hf = SiglipModel(SiglipConfig(**adapters.hf_siglip_config_dict(recipe.model))).eval()
    hf.load_state_dict(adapters.to_hf_siglip(model.state_dict()), strict=True)
    assert hf.logit_bias.item() == 0.0  # a softmax-loss model has none
    t = recipe.model.text
    tokens = torch.randint(1, t.vocab_size, (4, t.context_length), generator=torch.Generator().manual_seed(2))
    x = images(recipe, 4)
    with torch.no_grad():
        torch.testing.assert_close(features(hf.get_image_features(pixel_values=x)), model.towers["image"](x),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(features(hf.get_text_features(input_ids=tokens)), model.towers["text"](tokens),
                                   atol=1e-5, rtol=0)


def test_siglip_towers_refusals_are_one_line(siglip_dir):
    from towerlab.train.export import check_exportable

    recipe = load_recipe(None, [f"model.pretrained=hf:{siglip_dir}"])
    with pytest.raises(ConfigError, match=r"model\.vision\.pool=map: SigLIP-shaped towers have no OpenCLIP CLIP "
                                          r"layout .*--format hf") as e:
        check_exportable(recipe, "open_clip")
    assert "\n" not in str(e.value)
    half = load_recipe(None, [k for k in SIGLIP_TOWERS if "causal" not in k] + ["model.vision.width=32",
                                                                                "model.embed_dim=32"])
    with pytest.raises(ConfigError, match=r"model\.text\.causal=true: transformers' SiglipModel needs false") as e:
        adapters.hf_siglip_config_dict(half.model)
    assert "\n" not in str(e.value)
    clip_end = load_recipe(None, ["model.text.pool=end"])
    with pytest.raises(ConfigError, match=r"model\.text\.pool=end: transformers' CLIPModel pools at the first"):
        adapters.hf_config_dict(clip_end.model)
    bidirectional = load_recipe(None, ["model.text.causal=false", "model.text.pool=eos", "model.text.eos_id=3"])
    with pytest.raises(ConfigError, match=r"model\.text\.causal=false: transformers' CLIPModel needs true"):
        adapters.hf_config_dict(bidirectional.model)
    with pytest.raises(ConfigError, match=r"model\.text\.causal=false: OpenCLIP's CLIP needs true"):
        adapters.open_clip_config(bidirectional.model)
