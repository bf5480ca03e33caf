"""Model families behind one interface: a checkpoint's family from its config.json (model_type, remapped by its
architectures), a --model value's family without weights or torch, each family answering the one protocol, and no
module outside a family's package telling the families apart by their classes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY
from vl2cli.engine.family import family_kind, get_family, read_family_config
from vl2cli.engine.hub import model_kind
from vl2cli.errors import ConfigError, UsageError

PACKAGE = Path(__file__).parent.parent / "vl2cli"
FAMILY_PACKAGES = ("vl2", "ocr", "ocr2")


def _folder(tmp_path: Path, architecture: str, input_dim: int | None = None, model_type: str = "deepseek_vl_v2") -> Path:
    """A config-only checkpoint folder: the tiny parity config, as another family's (linear projector of its width)."""
    raw = json.loads((Path(TINY) / "config.json").read_text())
    raw["architectures"], raw["model_type"] = [architecture], model_type
    if input_dim is not None:
        raw["projector_config"] = {"projector_type": "linear", "input_dim": input_dim,
                                   "n_embed": raw["language_config"]["hidden_size"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(("raw", "kind"), [
    ({"model_type": "deepseek_vl_v2", "architectures": ["DeepseekVLV2ForCausalLM"]}, "vl2"),
    ({"architectures": ["DeepseekVLV2ForCausalLM"]}, "vl2"),  # no model_type: DeepSeek-VL2's own code never reads it
    ({"model_type": "deepseek_vl_v2", "architectures": ["DeepseekOCRForCausalLM"]}, "ocr"),
    ({"model_type": "deepseek_vl_v2", "architectures": ["DeepseekOCR2ForCausalLM"]}, "ocr2"),
    ({"model_type": "deepseek_ocr2"}, "ocr2"),
])
def test_a_config_names_its_family_by_model_type_remapped_by_architecture(raw, kind):
    assert family_kind(raw) == kind


def test_a_config_of_no_known_family_is_refused_by_its_model_type():
    with pytest.raises(ConfigError, match="model_type = 'llama': not a DeepSeek-VL2"):
        family_kind({"model_type": "llama", "architectures": ["DeepseekOCRForCausalLM"]})
    with pytest.raises(ConfigError, match="no model family 'llava'"):
        get_family("llava")


@pytest.mark.parametrize(("spec", "kind"), [("ocr", "ocr"), ("ocr2", "ocr2"), ("deepseek-ai/DeepSeek-OCR", "ocr"),
                                            ("hf:deepseek-ai/DeepSeek-OCR-2", "ocr2"), (TINY, "vl2")])
def test_a_model_value_names_its_family(spec, kind):
    assert model_kind(spec) == kind


def test_a_local_folder_is_told_by_its_config_which_is_validated(tmp_path):
    assert model_kind(str(_folder(tmp_path, "DeepseekOCRForCausalLM", 2048))) == "ocr"
    assert model_kind(str(_folder(tmp_path, "DeepseekOCR2ForCausalLM", 896))) == "ocr2"
    family, cfg = read_family_config(tmp_path)
    assert (family.kind, cfg.kind, family.prompts) == ("ocr2", "ocr2", "ocr")
    _folder(tmp_path, "DeepseekOCR2ForCausalLM", 896, model_type="deepseek_ocr2")  # the family's own model_type
    assert read_family_config(tmp_path)[0].kind == "ocr2"
    _folder(tmp_path, "DeepseekOCR2ForCausalLM", 896, model_type="deepseek_ocr")  # model_type wins: DeepSeek-OCR's
    with pytest.raises(ConfigError, match="DeepSeek-OCR projects 2048 channels"):
        read_family_config(tmp_path)
    _folder(tmp_path, "DeepseekOCR2ForCausalLM", 2048)  # DeepSeek-OCR's projector width in a DeepSeek-OCR 2 config
    with pytest.raises(ConfigError, match=r"config\.json: .*DeepSeek-OCR 2 projects 896 channels"):
        model_kind(str(tmp_path))


def test_telling_a_family_imports_neither_torch_nor_numpy(tmp_path):
    """`vl2 --help` and usage errors stay fast: the family of a folder, its prompt family and its mode check come from
    config.json and each family's torch-free module."""
    folder = _folder(tmp_path, "DeepseekOCR2ForCausalLM", 896)
    code = ("import sys\n"
            "from vl2cli.engine.family import get_family\n"
            "from vl2cli.engine.hub import model_kind\n"
            f"kinds = [model_kind(p) for p in ({TINY!r}, {str(folder)!r}, 'ocr')]\n"
            "assert kinds == ['vl2', 'ocr2', 'ocr'], kinds\n"
            "assert [get_family(k).prompts for k in kinds] == ['vl2', 'ocr', 'ocr']\n"
            "get_family('ocr2').check_mode('gundam')\n"
            "heavy = sorted({'torch', 'numpy', 'PIL.Image'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_each_family_checks_its_own_modes_and_traces():
    get_family("vl2").check_mode("tiny")  # DeepSeek-OCR's modes do not apply: nothing to refuse
    get_family("ocr").check_mode("tiny")
    with pytest.raises(UsageError, match="expected one of tiny, small, base, large, gundam"):
        get_family("ocr").check_mode("huge")
    get_family("ocr2").check_mode("gundam")
    with pytest.raises(UsageError, match="DeepSeek-OCR 2 reads in one setting only"):
        get_family("ocr2").check_mode("base")
    get_family("vl2").check_trace(0, None)
    get_family("vl2").check_trace(3, None)
    for kind in ("ocr", "ocr2"):
        with pytest.raises(UsageError, match="takes exactly one --image"):
            get_family(kind).check_trace(2, None)
    with pytest.raises(UsageError, match="one setting only"):
        get_family("ocr2").check_trace(1, "small")


def _family_classes() -> dict[str, set[str]]:
    """Classes defined in each family's package."""
    found: dict[str, set[str]] = {}
    for kind in FAMILY_PACKAGES:
        for path in (PACKAGE / "engine" / kind).glob("*.py"):
            tree = ast.parse(path.read_text())
            found.setdefault(kind, set()).update(n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef))
    return found


def test_no_module_outside_a_family_tells_the_families_apart_by_their_classes():
    """isinstance (and issubclass) on a family's classes only inside that family's own package: everywhere else the
    families answer engine.family's protocol."""
    classes = _family_classes()
    assert {"VL2Config", "DeepseekVL2", "Processor"} <= classes["vl2"]
    assert {"OCRConfig", "DeepseekOCR", "OCRProcessor"} <= classes["ocr"]
    offences = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        own = parts[1] if len(parts) > 2 and parts[0] == "engine" and parts[1] in FAMILY_PACKAGES else None
        foreign = set().union(*(names for kind, names in classes.items() if kind != own))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | {
                    n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                offences += [f"{path.relative_to(PACKAGE)}:{node.lineno} {name}" for name in named & foreign]
    assert not offences, offences
