"""The model bundle: the one contract between the controller (`quantization`) and the car (`rover_runtime`).

A bundle is a directory holding `manifest.json` and the files it lists (the model file, and nothing else
unless the manifest names it), and optionally `manifest.json.sig`, an SSH signature of the manifest (checked
by the deploy on the car with `ssh-keygen -Y verify`, not here; it is not listed in the manifest). Every
file's sha256 and size are recorded in the manifest; `open_bundle`
verifies all of them and the schema before anything is loaded, and refuses a bundle that does not match,
with a message naming the offending file or key. The format is described in `docs/bundle-format.md`.

Model calling convention (the same for TorchScript and ONNX):
- inputs, positional and in this order: `observation.state` float32 [B, state_dim] in real units, then one
  float32 image tensor [B, 3, H, W] per camera, RGB, values in [0, 1], in the order of `inputs.images`;
- output: `action` float32 [B, chunk_size, action_dim] in real units (normalization is baked in).

This module uses only the standard library so that both sides, and the car, can import it anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from rover_runtime.safe_files import UnsafeFileError, check_tree, listed_path, read_json_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The manifest's SSH signature (`ssh-keygen -Y sign -n rover-bundle`): the one file a bundle may hold that the
# manifest does not list (it signs the manifest, so the manifest cannot record it). Never read here.
SIGNATURE_NAME = "manifest.json.sig"
MODES = ("fp32", "dynamic", "static")
# Each backend runs exactly one model format.
BACKEND_FORMATS = {"torch": "torchscript", "onnxruntime": "onnx", "executorch": "pte"}
BACKENDS = tuple(BACKEND_FORMATS)
MODEL_FORMATS = tuple(BACKEND_FORMATS.values())
_HASH_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a real manifest is a few kB


class BundleError(Exception):
    """A bundle is missing, malformed, or does not match its manifest."""


@dataclass(frozen=True)
class ImageInput:
    """One camera input: its lerobot feature key and the (channels, height, width) the model expects."""

    key: str
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class InputSpec:
    state_key: str
    state_dim: int
    state_names: tuple[str, ...]
    images: tuple[ImageInput, ...]
    image_layout: str = "NCHW"
    image_channel_order: str = "RGB"
    image_value_range: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class OutputSpec:
    action_key: str
    action_names: tuple[str, ...]
    action_dim: int
    chunk_size: int
    n_action_steps: int
    temporal_ensemble_coeff: float | None = None


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Calibration:
    """How a static bundle was calibrated; `requested == succeeded == 0` for modes that need none."""

    requested: int = 0
    succeeded: int = 0
    failures: tuple[str, ...] = ()
    dataset: str | None = None
    episodes: tuple[int, ...] = ()
    float_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delegation:
    """How much of an ExecuTorch program runs in its delegate (XNNPACK); the rest runs in portable kernels.

    `not_delegated` lists "operator: count" for the compute nodes left outside.
    """

    delegate: str
    nodes_delegated: int
    nodes_not_delegated: int
    not_delegated: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        total = self.nodes_delegated + self.nodes_not_delegated
        return self.nodes_delegated / total if total else 0.0


@dataclass(frozen=True)
class Verification:
    """What `quantize` proved before it published the bundle: the model file, loaded by the car's own backend
    (`runtime`, `runtime_version`), ran `frames` held-out frames, and its action chunks were this far from the
    FP32 reference (the float model the file was made from), in real units and in % of the action range,
    within `tolerance_mae_pct` / `tolerance_max_pct`."""

    frames: int
    reference: str
    runtime: str
    runtime_version: str
    threads: int
    mae: float
    max_abs: float
    mae_pct_range: float
    max_pct_range: float
    tolerance_mae_pct: float
    tolerance_max_pct: float
    weights_ratio: float | None = None  # INT8 modes: the model file's size / the float weights' bytes


@dataclass(frozen=True)
class SourcePolicy:
    path: str
    weights_sha256: str
    policy_type: str
    lerobot_version: str
    torch_version: str
    parameters_total: int = 0
    parameters_inference: int = 0
    checkpoint_bytes: int = 0


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    model_file: str
    model_format: str
    mode: str
    backend: str
    engine: str | None
    source: SourcePolicy
    inputs: InputSpec
    outputs: OutputSpec
    normalization: str
    calibration: Calibration
    files: tuple[FileEntry, ...]
    created_at: str
    tool_versions: dict[str, str] = field(default_factory=dict)
    delegation: Delegation | None = None  # ExecuTorch bundles: what runs in the delegate
    verification: Verification | None = None  # what quantize ran before publishing (absent: older bundles)

    def to_json(self) -> str:
        raw = asdict(self)
        for key in ("delegation", "verification"):
            if raw[key] is None:  # absent, not null: a bundle without one keeps its content hash
                del raw[key]
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @property
    def model_bytes(self) -> int:
        return next(f.size for f in self.files if f.path == self.model_file)

    @property
    def content_hash(self) -> str:
        """The bundle's identity (names releases on the car): the sha256 of its canonical manifest.

        The manifest lists every file's sha256, so this covers the files and the metadata alike: two bundles
        with the same model file but different manifests are different releases.
        """
        return hashlib.sha256(self.to_json().encode()).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path) -> tuple[FileEntry, ...]:
    """Hash every regular file under `root` except the manifest and its signature, in a stable order."""
    entries = []
    for path in sorted(
        p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and p != root / SIGNATURE_NAME
    ):
        rel = path.relative_to(root).as_posix()
        entries.append(FileEntry(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    return tuple(entries)


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` into `root` (the caller publishes the directory atomically)."""
    validate_manifest_dict(json.loads(manifest.to_json()))
    target = root / MANIFEST_NAME
    target.write_text(manifest.to_json(), encoding="utf-8")
    return target


def open_bundle(root: Path | str, *, verify_hashes: bool = True) -> Bundle:
    """Open a bundle directory, verify its schema and every file against the manifest, and return it.

    Raises BundleError naming the problem and the file: a missing, oversized (> 1 MiB) or unparsable
    manifest (invalid JSON, a duplicate key, a number or nesting too large to parse), a schema error
    (naming the key), a symlink or other non-regular file anywhere in the bundle, a listed path that
    resolves outside the bundle, a listed file that is missing or whose size or sha256 differs, or a file
    present but not listed (other than `manifest.json.sig` beside the manifest, which is allowed and not
    read: the deploy verifies the signature on the car). Nothing else escapes for a bad bundle (unreadable
    files too are BundleError).
    """
    root = Path(root)
    try:
        return _open_bundle(root, verify_hashes)
    except OSError as exc:  # e.g. a permission error the specific checks did not expect
        raise BundleError(f"bundle {root}: cannot be read: {exc}") from exc


def _open_bundle(root: Path, verify_hashes: bool) -> Bundle:
    if not root.is_dir():
        raise BundleError(f"bundle {root}: not a directory")
    where, kind = f"bundle {root}", "bundle"
    try:
        root.resolve(strict=True)  # the bundle directory itself may be a symlink ("current")
    except (OSError, RuntimeError) as exc:
        raise BundleError(f"bundle {root}: cannot resolve the directory: {exc}") from exc
    try:
        raw = read_json_file(root, MANIFEST_NAME, where=where, max_bytes=MAX_MANIFEST_BYTES, kind=kind)
        manifest = validate_manifest_dict(raw, where=str(root / MANIFEST_NAME))
        # Cheap structural checks first (no listed path leaves the bundle or is a symlink, nothing unlisted
        # or irregular is present), then sizes and sha256s.
        paths = [(e, listed_path(root, e.path, where=where, kind=kind)) for e in manifest.files]
        listed = {entry.path for entry in manifest.files} | {MANIFEST_NAME, SIGNATURE_NAME}
        check_tree(root, listed, where=where, kind=kind, listing="the manifest")
    except UnsafeFileError as exc:
        raise BundleError(str(exc)) from exc
    for entry, path in paths:
        if not path.is_file():
            raise BundleError(f"bundle {root}: {entry.path} is listed in the manifest but missing")
        try:
            size = path.stat().st_size
            if size != entry.size:
                raise BundleError(
                    f"bundle {root}: {entry.path} has {size} bytes, the manifest says {entry.size}"
                )
            if verify_hashes and sha256_file(path) != entry.sha256:
                raise BundleError(f"bundle {root}: {entry.path} does not match its sha256 in the manifest")
        except OSError as exc:
            raise BundleError(f"bundle {root}: {entry.path} cannot be read: {exc}") from exc
    return Bundle(root=root, manifest=manifest)


# --- schema validation -------------------------------------------------------------------------------


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise BundleError(f"{where}: missing key '{key}'")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise BundleError(f"{where}: key '{key}' must be {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise BundleError(f"{where}: key '{key}' must be {_kind_name(kinds)}, got {value!r}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _positive(value: int, key: str, where: str) -> int:
    if value <= 0:
        raise BundleError(f"{where}: key '{key}' must be positive, got {value}")
    return value


def _str_tuple(obj: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _get(obj, key, list, where)
    if not all(isinstance(v, str) for v in values):
        raise BundleError(f"{where}: key '{key}' must be a list of strings")
    return tuple(values)


def _choice(obj: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> str:
    value: str = _get(obj, key, str, where)
    if value not in choices:
        raise BundleError(f"{where}: key '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def _safe_relpath(value: str, key: str, where: str) -> str:
    """A relative POSIX path in canonical form (no `.`, `..`, empty parts or NUL): not the manifest or its
    signature."""
    path = PurePosixPath(value)
    if (
        not value
        or "\x00" in value
        or path.is_absolute()
        or ".." in path.parts
        or path.as_posix() != value
        or value in (MANIFEST_NAME, SIGNATURE_NAME)
    ):
        raise BundleError(f"{where}: key '{key}' has an unsafe file path {value!r}")
    return value


def validate_manifest_dict(raw: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a parsed manifest and build a Manifest, or raise BundleError naming the key."""
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: the manifest must be a JSON object")
    version = _get(raw, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{where}: schema_version {version} is not supported (this reader knows {SCHEMA_VERSION})"
        )
    model_format = _choice(raw, "model_format", MODEL_FORMATS, where)
    mode = _choice(raw, "mode", MODES, where)
    backend = _choice(raw, "backend", BACKENDS, where)
    if BACKEND_FORMATS[backend] != model_format:
        raise BundleError(
            f"{where}: backend {backend!r} runs model_format {BACKEND_FORMATS[backend]!r}, "
            f"not {model_format!r}"
        )
    engine = _get(raw, "engine", (str, type(None)), where)

    src = _get(raw, "source", dict, where)
    source = SourcePolicy(
        path=_get(src, "path", str, f"{where} source"),
        weights_sha256=_get(src, "weights_sha256", str, f"{where} source"),
        policy_type=_get(src, "policy_type", str, f"{where} source"),
        lerobot_version=_get(src, "lerobot_version", str, f"{where} source"),
        torch_version=_get(src, "torch_version", str, f"{where} source"),
        parameters_total=_get(src, "parameters_total", int, f"{where} source"),
        parameters_inference=_get(src, "parameters_inference", int, f"{where} source"),
        checkpoint_bytes=_get(src, "checkpoint_bytes", int, f"{where} source"),
    )

    ins = _get(raw, "inputs", dict, where)
    w_in = f"{where} inputs"
    images = []
    for i, img in enumerate(_get(ins, "images", list, w_in)):
        w_img = f"{w_in} images[{i}]"
        if not isinstance(img, dict):
            raise BundleError(f"{w_img}: must be an object")
        shape = _get(img, "shape", list, w_img)
        if len(shape) != 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
        ):
            raise BundleError(f"{w_img}: key 'shape' must be three positive integers [C, H, W], got {shape}")
        if shape[0] != 3:
            raise BundleError(f"{w_img}: key 'shape' must have 3 channels first, got {shape}")
        images.append(ImageInput(key=_get(img, "key", str, w_img), shape=(shape[0], shape[1], shape[2])))
    state_names = _str_tuple(ins, "state_names", w_in)
    state_dim = _positive(_get(ins, "state_dim", int, w_in), "state_dim", w_in)
    if len(state_names) != state_dim:
        raise BundleError(f"{w_in}: 'state_names' has {len(state_names)} names for state_dim {state_dim}")
    value_range = _get(ins, "image_value_range", list, w_in)
    if len(value_range) != 2 or not all(isinstance(v, int | float) for v in value_range):
        raise BundleError(f"{w_in}: key 'image_value_range' must be two numbers")
    inputs = InputSpec(
        state_key=_get(ins, "state_key", str, w_in),
        state_dim=state_dim,
        state_names=state_names,
        images=tuple(images),
        image_layout=_choice(ins, "image_layout", ("NCHW",), w_in),
        image_channel_order=_choice(ins, "image_channel_order", ("RGB",), w_in),
        image_value_range=(float(value_range[0]), float(value_range[1])),
    )

    outs = _get(raw, "outputs", dict, where)
    w_out = f"{where} outputs"
    action_names = _str_tuple(outs, "action_names", w_out)
    action_dim = _positive(_get(outs, "action_dim", int, w_out), "action_dim", w_out)
    if len(action_names) != action_dim:
        raise BundleError(
            f"{w_out}: 'action_names' has {len(action_names)} names for action_dim {action_dim}"
        )
    chunk_size = _positive(_get(outs, "chunk_size", int, w_out), "chunk_size", w_out)
    n_action_steps = _positive(_get(outs, "n_action_steps", int, w_out), "n_action_steps", w_out)
    if n_action_steps > chunk_size:
        raise BundleError(f"{w_out}: n_action_steps {n_action_steps} exceeds chunk_size {chunk_size}")
    coeff = _get(outs, "temporal_ensemble_coeff", (int, float, type(None)), w_out)
    if coeff is not None and not math.isfinite(coeff):
        raise BundleError(f"{w_out}: key 'temporal_ensemble_coeff' must be finite")
    outputs = OutputSpec(
        action_key=_get(outs, "action_key", str, w_out),
        action_names=action_names,
        action_dim=action_dim,
        chunk_size=chunk_size,
        n_action_steps=n_action_steps,
        temporal_ensemble_coeff=None if coeff is None else float(coeff),
    )

    cal = _get(raw, "calibration", dict, where)
    w_cal = f"{where} calibration"
    episodes = _get(cal, "episodes", list, w_cal)
    if not all(isinstance(e, int) for e in episodes):
        raise BundleError(f"{w_cal}: key 'episodes' must be a list of integers")
    calibration = Calibration(
        requested=_get(cal, "requested", int, w_cal),
        succeeded=_get(cal, "succeeded", int, w_cal),
        failures=_str_tuple(cal, "failures", w_cal),
        dataset=_get(cal, "dataset", (str, type(None)), w_cal),
        episodes=tuple(episodes),
        float_layers=_str_tuple(cal, "float_layers", w_cal),
    )

    files = []
    seen: set[str] = set()
    for i, entry in enumerate(_get(raw, "files", list, where)):
        w_f = f"{where} files[{i}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{w_f}: must be an object")
        digest = _get(entry, "sha256", str, w_f)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"{w_f}: key 'sha256' is not a lowercase hex sha256")
        size = _get(entry, "size", int, w_f)
        if size < 0:
            raise BundleError(f"{w_f}: key 'size' must not be negative")
        path = _safe_relpath(_get(entry, "path", str, w_f), "path", w_f)
        if path in seen:
            raise BundleError(f"{w_f}: {path} is listed twice in 'files'")
        seen.add(path)
        files.append(FileEntry(path=path, sha256=digest, size=size))
    model_file = _safe_relpath(_get(raw, "model_file", str, where), "model_file", where)
    if model_file not in {f.path for f in files}:
        raise BundleError(f"{where}: model_file {model_file!r} is not listed in 'files'")
    tool_versions = _get(raw, "tool_versions", dict, where)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tool_versions.items()):
        raise BundleError(f"{where}: key 'tool_versions' must map strings to strings")

    return Manifest(
        schema_version=version,
        model_file=model_file,
        model_format=model_format,
        mode=mode,
        backend=backend,
        engine=engine,
        source=source,
        inputs=inputs,
        outputs=outputs,
        normalization=_choice(raw, "normalization", ("baked",), where),
        calibration=calibration,
        files=tuple(files),
        created_at=_get(raw, "created_at", str, where),
        tool_versions=dict(tool_versions),
        delegation=_delegation(raw, where),
        verification=_verification(raw, where),
    )


def _delegation(raw: dict[str, Any], where: str) -> Delegation | None:
    """The optional `delegation` object (ExecuTorch bundles)."""
    if raw.get("delegation") is None:
        return None
    obj = _get(raw, "delegation", dict, where)
    w_del = f"{where} delegation"
    counts = [_get(obj, key, int, w_del) for key in ("nodes_delegated", "nodes_not_delegated")]
    if min(counts) < 0:
        raise BundleError(f"{w_del}: node counts must not be negative")
    return Delegation(
        delegate=_get(obj, "delegate", str, w_del),
        nodes_delegated=counts[0],
        nodes_not_delegated=counts[1],
        not_delegated=_str_tuple(obj, "not_delegated", w_del),
    )


def _verification(raw: dict[str, Any], where: str) -> Verification | None:
    """The optional `verification` object (bundles written by a quantize that verifies)."""
    if raw.get("verification") is None:
        return None
    obj = _get(raw, "verification", dict, where)
    w_ver = f"{where} verification"
    numbers = {
        key: float(_get(obj, key, (int, float), w_ver))
        for key in (
            "mae",
            "max_abs",
            "mae_pct_range",
            "max_pct_range",
            "tolerance_mae_pct",
            "tolerance_max_pct",
        )
    }
    if not all(math.isfinite(v) and v >= 0 for v in numbers.values()):
        raise BundleError(f"{w_ver}: errors and tolerances must be finite and not negative")
    ratio = _get(obj, "weights_ratio", (int, float, type(None)), w_ver)
    return Verification(
        frames=_positive(_get(obj, "frames", int, w_ver), "frames", w_ver),
        reference=_get(obj, "reference", str, w_ver),
        runtime=_get(obj, "runtime", str, w_ver),
        runtime_version=_get(obj, "runtime_version", str, w_ver),
        threads=_positive(_get(obj, "threads", int, w_ver), "threads", w_ver),
        weights_ratio=None if ratio is None else float(ratio),
        **numbers,
    )
