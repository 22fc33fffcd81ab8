"""Built-in model names always mean the shipped models, a path is a path (``./hard``, a separator or a suffix), the
summary records the file used; every file that is not a model ends in one line (``/etc/passwd`` was a 41-line
traceback), and the refusal of a pickle speaks kflow's words, never PyTorch's advice to load it unsafely."""
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from kflow.cli import main
from kflow.molecular.assemble.models import AssemblyModel
from kflow.molecular.assemble.pretrained import PRETRAINED_DIR, list_pretrained, read_pretrained, resolve_pretrained
from testkit import SDF, one_error_line


def test_a_file_named_like_a_shipped_model_never_replaces_it(tmp_path, monkeypatch):
    assert "hard" in list_pretrained()
    monkeypatch.chdir(tmp_path)
    Path("hard").write_text("not a model\n")
    assert resolve_pretrained("hard") == PRETRAINED_DIR / "hard.pt"
    assert AssemblyModel.load("hard").path == str((PRETRAINED_DIR / "hard.pt").resolve())
    assert resolve_pretrained("./hard") == tmp_path / "hard"
    with pytest.raises(ValueError, match=f"^{tmp_path / 'hard'}: corrupt, truncated or another kind of file"):
        read_pretrained("./hard")


def test_a_path_is_read_as_a_path_and_the_summary_names_the_file(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("hard").write_bytes(Path(tiny_model).read_bytes())  # a copy of another model saved as ./hard
    out = tmp_path / "run"
    assert main(["assemble", str(SDF), "--out", str(out), "--model", "./hard", "--samples", "1",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == {**summary["model"], "name": "./hard", "path": str((tmp_path / "hard").resolve())}
    assert str((tmp_path / "hard").resolve()) in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"no pretrained model named 'tiny' \(a file in this folder\? give "
                                                r"it as a path: ./tiny\)"):
        Path("tiny").write_bytes(b"")
        resolve_pretrained("tiny")


def _files(tmp_path: Path, model: Path) -> dict:
    good = model.read_bytes()
    payload = tmp_path / "payload.pt"
    torch.save({"format": "kflow-pretrained", "evil": io.BytesIO(b"x")}, payload)  # an object: a pickle payload
    zipped = tmp_path / "truncated.pt"
    zipped.write_bytes(good[: len(good) // 2])
    bad_zip = tmp_path / "bad_zip.pt"
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    pickled = tmp_path / "list.pt"
    pickled.write_bytes(pickle.dumps([1, 2, 3]))
    return {"payload": payload, "truncated": zipped, "bad_zip": bad_zip, "empty": empty, "noise": noise,
            "passwd": text, "plain_pickle": pickled}


def test_every_file_that_is_not_a_model_ends_in_one_line(tiny_model, tmp_path, capsys):
    paths = _files(tmp_path, Path(tiny_model))
    if Path("/etc/passwd").is_file():
        paths["etc_passwd"] = Path("/etc/passwd")
    for label, path in paths.items():
        with pytest.raises(ValueError, match="not a kflow pretrained model") as err:
            read_pretrained(path)
        assert "\n" not in str(err.value), label
        out = tmp_path / f"out_{label}"
        assert main(["assemble", str(SDF), "--out", str(out), "--model", str(path), "--no-progress"]) == 1, label
        line = one_error_line(capsys)
        assert "weights_only" not in line and "will likely succeed" not in line, line
        assert not out.exists()


def test_the_pickle_refusal_speaks_kflows_words(tiny_model, tmp_path):
    with pytest.raises(ValueError) as err:
        read_pretrained(_files(tmp_path, Path(tiny_model))["payload"])
    text = str(err.value)
    assert "refuses to load because loading them could run code" in text and "save_pretrained" in text
    assert "weights_only" not in text and "torch" not in text.lower().replace("kflow", "")


def test_a_folder_or_device_given_as_a_model_ends_in_one_line(tmp_path, capsys):
    for model in (str(tmp_path), "/dev/null"):
        assert main(["assemble", str(SDF), "--out", str(tmp_path / "x"), "--model", model, "--no-progress"]) == 1
        assert "not a model file" in one_error_line(capsys)
