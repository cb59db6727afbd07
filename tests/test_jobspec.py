"""load_job and safe_extract on crafted job folders and uploads: each refusal is one JobSpecError line
naming the file and the field, never an internal error."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedgrid import jobspec, tensors
from fedgrid.errors import JobSpecError

SERVER_JSON = "app/config/server.json"
CLIENT_JSON = "app/config/client.json"
MODEL = "app/config/initial_model.safetensors"


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A valid job folder: one app sent to the server and every site."""
    folder = tmp_path / "job"
    (folder / "app/config").mkdir(parents=True)
    (folder / "app/custom").mkdir()
    _write_json(folder / "meta.json", {"name": "tiny", "deploy_map": {"app": ["@ALL"]}})
    _write_json(folder / SERVER_JSON, {"num_rounds": 2, "min_clients": 1})
    _write_json(folder / CLIENT_JSON, {"script": "train.py", "args": ["--epochs", "1"]})
    tensors.save_file({"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}, folder / MODEL)
    (folder / "app/custom/train.py").write_text("print('training')\n")
    return folder


def _set(rel: str, **values: object) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        data = json.loads((folder / rel).read_text())
        data.update(values)
        _write_json(folder / rel, data)

    return change


def _text(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / rel
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return change


def _into_file(rel: str) -> Callable[[Path], None]:
    """Replace the folder `rel` by a file of the same name."""

    def change(folder: Path) -> None:
        shutil.rmtree(folder / rel)
        (folder / rel).write_text("not a folder")

    return change


def _link(rel: str, target: str) -> Callable[[Path], None]:
    """Make `rel` a symbolic link to `target` (relative to the job folder), keeping what it held."""

    def change(folder: Path) -> None:
        path, goal = folder / rel, folder / target
        if path.exists() and not goal.exists():
            goal.parent.mkdir(parents=True, exist_ok=True)
            path.rename(goal)
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        path.symlink_to(os.path.relpath(goal, path.parent))

    return change


def _model_bytes(header: dict[str, object], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


DEEP = 100_000
HUGE = "9" * 5000

REFUSED: dict[str, tuple[Callable[[Path], None], str]] = {
    # JSON a parser must not choke on
    "nested JSON in server.json": (
        _text(SERVER_JSON, '{"num_rounds": 1, "min_clients": 1, "tracking": ' + "[" * DEEP + "]" * DEEP + "}"),
        f"{SERVER_JSON}: tracking[0][0][0][0][0]...: not valid JSON (recursion limit exceeded",
    ),
    "nested JSON in meta.json": (
        _text("meta.json", '{"name": "x", "resource_spec": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}"),
        "meta.json: resource_spec.a.a.a.a.a...: not valid JSON (recursion limit exceeded",
    ),
    "nested JSON in client.json": (
        _text(CLIENT_JSON, '{"script": "train.py", "args": ' + "[" * DEEP + "]" * DEEP + "}"),
        f"{CLIENT_JSON}: args[0][0][0][0][0]...: not valid JSON (recursion limit exceeded",
    ),
    "a number of thousands of digits": (
        _text(SERVER_JSON, '{"num_rounds": ' + HUGE + ', "min_clients": 1}'),
        f"{SERVER_JSON}: num_rounds: not valid JSON (number out of range",
    ),
    "a number of a thousand digits": (
        _text(SERVER_JSON, '{"num_rounds": ' + HUGE[:1000] + ', "min_clients": 1}'),
        f"{SERVER_JSON}: num_rounds must be an integer from 1 to 100000, got 99999",
    ),
    "an infinite number": (
        _text(SERVER_JSON, '{"num_rounds": 1, "min_clients": 1, "round_timeout": 1e999}'),
        f"{SERVER_JSON}: round_timeout must be a number from 0 to 604800, got inf",
    ),
    "not UTF-8": (_text(CLIENT_JSON, b"\xff\xfe{}"), f"{CLIENT_JSON}: not valid JSON (expected value"),
    "not an object": (_text("meta.json", "[1, 2]"), "meta.json: expected an object, got [1, 2]"),
    # fields
    "unknown key": (_set("meta.json", colour="red"), "meta.json: unknown key 'colour'; allowed: name, min_clients"),
    "nested unknown key": (
        _set(SERVER_JSON, target_metric={"name": "accuracy", "value": 0.9, "at": 3}),
        f"{SERVER_JSON}: target_metric: unknown key 'at'; allowed: name, value, mode",
    ),
    "text for a number": (_set(SERVER_JSON, num_rounds="2"), f"{SERVER_JSON}: num_rounds must be an integer"),
    "unknown workflow": (
        _set(SERVER_JSON, workflow="scaffold"),
        f"{SERVER_JSON}: workflow must be fedavg, got 'scaffold'",
    ),
    "tracking type": (
        _set(SERVER_JSON, tracking=[{"type": "wandb"}]),
        f"{SERVER_JSON}: tracking[0].type must be one of mlflow, tensorboard, got 'wandb'",
    ),
    "args not strings": (_set(CLIENT_JSON, args=["--epochs", 1]), f"{CLIENT_JSON}: args[1] must be a string, got 1"),
    "empty module": (
        _set(CLIENT_JSON, script="module:"),
        f"{CLIENT_JSON}: script must be a file in custom/ or module:<python module>, got 'module:'",
    ),
    "app name with a slash": (
        _set("meta.json", deploy_map={"app/../..": ["@ALL"]}),
        "meta.json: deploy_map key must be 1-64 letters, digits",
    ),
    "empty target list": (
        _set("meta.json", deploy_map={"app": []}),
        "meta.json: deploy_map['app'] must be a non-empty list of strings, got []",
    ),
    "resource not a number": (
        _set("meta.json", resource_spec={"@ALL": {"num_cpus": "2"}}),
        "meta.json: resource_spec['@ALL'].num_cpus must be a number from 0 to 1000000, got '2'",
    ),
    "encryption with a server optimizer": (
        _set(SERVER_JSON, encryption="ckks", server_lr=0.5),
        f"{SERVER_JSON}: encryption 'ckks' cannot be combined with a server optimizer",
    ),
    # the layout
    "config is a file": (_into_file("app/config"), "app/config is a file, where the job layout needs a folder"),
    "custom is a file": (
        _into_file("app/custom"),
        f"{CLIENT_JSON}: script 'train.py': app/custom is a file, where the job layout needs a folder",
    ),
    "app is a file": (_into_file("app"), "meta.json: deploy_map names app 'app', which is not a folder of the job"),
    "meta.json is a folder": (
        lambda f: ((f / "meta.json").unlink(), (f / "meta.json").mkdir()),
        "meta.json: is a folder, where the job layout needs a file",
    ),
    "meta.json missing": (lambda f: (f / "meta.json").unlink(), "meta.json: missing from the job folder"),
    "meta.json is a link": (_link("meta.json", "elsewhere/meta.json"), "meta.json is a link"),
    "app is a link": (
        _link("app", "other"),
        "meta.json: deploy_map names app 'app', which is not a folder of the job",
    ),
    "config is a link": (_link("app/config", "other"), "app/config is a link"),
    # files named by the configuration
    "absolute script": (
        _set(CLIENT_JSON, script="/etc/passwd"),
        f"{CLIENT_JSON}: script must be a relative path inside app/custom/ without '..', got '/etc/passwd'",
    ),
    "script outside custom": (
        _set(CLIENT_JSON, script="../config/server.json"),
        f"{CLIENT_JSON}: script must be a relative path inside app/custom/ without '..', got '../config/server.json'",
    ),
    "script missing": (
        lambda f: (f / "app/custom/train.py").unlink(),
        f"{CLIENT_JSON}: script 'train.py' is not a file in app/custom/",
    ),
    "script is a link": (
        _link("app/custom/train.py", "app/config/client.json"),
        f"{CLIENT_JSON}: script 'train.py': app/custom/train.py is a link",
    ),
    "script through a linked folder": (
        lambda f: (_link("app/custom", "elsewhere")(f), _set(CLIENT_JSON, script="train.py")(f)),
        f"{CLIENT_JSON}: script 'train.py': app/custom is a link",
    ),
    "script in a linked subfolder": (
        lambda f: (
            (f / "lib").mkdir(),
            (f / "lib/train.py").write_text(""),
            (f / "app/custom/lib").symlink_to("../../lib"),
            _set(CLIENT_JSON, script="lib/train.py")(f),
        ),
        f"{CLIENT_JSON}: script 'lib/train.py': app/custom/lib is a link",
    ),
    "absolute initial model": (
        _set(SERVER_JSON, initial_model="/etc/hostname"),
        f"{SERVER_JSON}: initial_model must be a relative path inside app/config/ without '..', got '/etc/hostname'",
    ),
    "initial model outside config": (
        _set(SERVER_JSON, initial_model="../custom/train.py"),
        f"{SERVER_JSON}: initial_model must be a relative path inside app/config/ without '..'",
    ),
    "initial model is a link": (
        _link(MODEL, "app/custom/model.safetensors"),
        f"{SERVER_JSON}: initial_model 'initial_model.safetensors': {MODEL} is a link",
    ),
    "initial model missing": (
        lambda f: (f / MODEL).unlink(),
        f"{SERVER_JSON}: initial_model 'initial_model.safetensors' is not a file in app/config/",
    ),
    # the initial model's content
    "initial model is not safetensors": (
        _text(MODEL, b"PK\x03\x04 a zip, a pickle or anything else"),
        f"{MODEL}: not a valid safetensors file",
    ),
    "initial model is truncated": (
        lambda f: (f / MODEL).write_bytes((f / MODEL).read_bytes()[:-5]),
        f"{MODEL}: not a valid safetensors file",
    ),
    "initial model with NaN": (
        lambda f: tensors.save_file({"w": np.array([1.0, np.nan], np.float32)}, f / MODEL),
        f"{MODEL}: tensor 'w' contains NaN or infinite values",
    ),
    "initial model with infinity": (
        lambda f: tensors.save_file({"a": np.ones(2), "z": np.array([np.inf], np.float16)}, f / MODEL),
        f"{MODEL}: tensor 'z' contains NaN or infinite values",
    ),
    "initial model in bfloat16": (
        _text(MODEL, _model_bytes({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)),
        f"{MODEL}: tensor 'w' has dtype BF16, which fedgrid does not use",
    ),
    "initial model without tensors": (_text(MODEL, _model_bytes({}, b"")), f"{MODEL}: holds no tensors"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_bad_job_folder_is_refused_with_one_line_naming_the_file(job: Path, case: str) -> None:
    jobspec.load_job(job)  # valid before
    damage, message = REFUSED[case]
    damage(job)
    with pytest.raises(JobSpecError) as caught:
        jobspec.load_job(job)
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text and len(text) < 400, text


def test_a_valid_job_folder_loads(job: Path) -> None:
    _set("meta.json", resource_spec={"@ALL": {"num_cpus": 2}, "site-1": {"memory_gb": 1.5}})(job)
    _set(SERVER_JSON, tracking=[{"type": "mlflow"}], target_metric={"name": "accuracy", "value": 0.9})(job)
    (job / "app/custom/lib").mkdir()
    (job / "app/custom/lib/train.py").write_text("")
    _set(CLIENT_JSON, script="lib/train.py")(job)

    spec = jobspec.load_job(job, known_sites={"site-1", "site-2"})

    assert (spec.name, spec.min_clients, spec.server_app) == ("tiny", 1, "app")
    assert spec.deploy_map == {"app": ("@ALL",)}
    assert (spec.server.num_rounds, spec.server.initial_model) == (2, "initial_model.safetensors")
    assert spec.server.tracking[0].type == "mlflow" and spec.server.target_metric.reached({"accuracy": 0.95})
    assert spec.clients["app"].script == "lib/train.py" and spec.clients["app"].args == ("--epochs", "1")
    assert spec.needs("site-1") == {"num_cpus": 2.0, "memory_gb": 1.5}
    assert spec.needs("site-2") == {"num_cpus": 2.0}


def test_a_big_initial_model_is_checked_tensor_by_tensor(job: Path) -> None:
    """Every tensor is read, the last one too, whatever the model's size."""
    arrays = {f"layer{i:02d}": np.ones((256, 256), np.float32) for i in range(40)}
    arrays["layer39"][255, 255] = np.nan
    tensors.save_file(arrays, job / MODEL)
    with pytest.raises(JobSpecError, match="tensor 'layer39' contains NaN"):
        jobspec.load_job(job)


# --- uploads -------------------------------------------------------------------------------------


def _zip(*names: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, b"" if name.endswith("/") else b"data")
    return buffer.getvalue()


def _corrupt() -> bytes:
    data = bytearray(_zip("app/custom/train.py"))
    data[data.index(b"data")] ^= 0xFF  # the stored bytes no longer match their CRC
    return bytes(data)


UPLOADS = {
    "a file and a folder": (_zip("app/custom", "app/custom/train.py"), "'app/custom' is both a file and a folder"),
    "a folder and a file": (_zip("app/custom/train.py", "app/custom"), "'app/custom' is both a file and a folder"),
    "a deeper file": (_zip("app", "app/config/server.json"), "'app' is both a file and a folder"),
    "a folder entry and a file": (_zip("app/", "app"), "'app' appears twice"),
    "the same file twice, written apart": (_zip("app/x.py", "app//x.py"), "'app//x.py' appears twice"),
    "a corrupt entry": (_corrupt(), "cannot unpack 'app/custom/train.py'"),
}


@pytest.mark.parametrize("case", sorted(UPLOADS))
def test_an_odd_upload_is_refused(tmp_path: Path, case: str) -> None:
    data, message = UPLOADS[case]
    with pytest.raises(JobSpecError, match="^job upload: ") as caught:
        jobspec.safe_extract(data, tmp_path, max_bytes=1 << 20, max_files=100)
    assert message in str(caught.value)
    if case != "a corrupt entry":
        assert list(tmp_path.iterdir()) == []  # refused before anything is written
