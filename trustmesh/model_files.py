"""`trustmesh model export WORKFLOW [--round N] -o FILE` and `trustmesh model evaluate FILE --data FILE.npz`.

export: the global model of a round (default: the latest round with a result) is read from
Redis, or from the CouchDB history where Redis has no good copy, and written only after
fl/model_format.py checked it against the digest the chain recorded for that round (and its
canonical form, the workflow's model spec, workflow id and round). `.safetensors` writes the
stored bytes as they are (any safetensors reader loads them; their sha256 is the on-chain
digest); `.pt` writes the state_dict with torch.save. A copy that does not match is refused,
whichever store holds it, and nothing is written.

evaluate: accuracy and mean cross-entropy of a model file on an .npz data set (`x` float32
[n, features], `y` int64 [n]). The architecture is read from the tensors' shapes (MLP
layers.{i}.weight / .bias); for a .safetensors file it must hash to the model spec digest the
file's metadata names, so a file cannot be evaluated as something it is not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import re
import struct
import sys
from collections import OrderedDict
from typing import Callable, Mapping

from trustmesh import endpoints as network

SUFFIXES = (".safetensors", ".pt")
_LAYER = re.compile(r"\Alayers\.(\d+)\.(weight|bias)\Z")


class ModelCommandError(Exception):
    """A model cannot be exported or evaluated as asked; the message says why and what to do."""


def _suffix(path: str, flag: str) -> str:
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelCommandError(f"{flag} {path!r} must end in .safetensors or .pt (the format is chosen by the "
                                f"file name)")
    return suffix


# ------------------------------------------------------------------------------ export


async def _global_model(rest, workflow_id: str, number: int | None) -> tuple[int, dict, dict, str]:
    """(round, round result, model spec, head) for the round asked, or the latest with a result."""
    from trustmesh.scheduling.reader import FederationReader

    head = (await rest.head())["header_signature"]
    reader = FederationReader(rest, head)
    record = await reader.workflow(workflow_id)
    if record is None:
        raise ModelCommandError(f"workflow {workflow_id!r} is not on chain; `trustmesh workflow list` shows what is")
    definition = record["definition"]
    if "federation" not in definition:
        raise ModelCommandError(f"workflow {workflow_id!r} is single-node: it keeps no global model on chain "
                                f"(`trustmesh run` wrote its model to HOME/models)")
    index = await reader.rounds(workflow_id)
    rounds = sorted(int(n) for n in index["rounds"])
    if number is not None:
        if str(number) not in index["rounds"]:
            opened = f"rounds 1–{rounds[-1]} have opened" if rounds else "no round has opened yet"
            raise ModelCommandError(f"workflow {workflow_id!r} has no round {number} ({opened})")
        result = await reader.round_result(index["rounds"][str(number)])
        if result is None:
            round_record = await reader.round(index["rounds"][str(number)]) or {}
            raise ModelCommandError(f"round {number} of {workflow_id!r} has no global model yet (it is "
                                    f"{round_record.get('status', 'open')}); wait for its result, or leave out "
                                    f"--round for the latest model")
        return number, result, definition["model"], head
    for candidate in reversed(rounds):
        result = await reader.round_result(index["rounds"][str(candidate)])
        if result is not None:
            return candidate, result, definition["model"], head
    raise ModelCommandError(f"workflow {workflow_id!r} has no global model yet "
                            f"({'round ' + str(rounds[-1]) + ' is under way' if rounds else 'no round has opened'})")


async def _copies(where: network.Endpoints, workflow_id: str, number: int, digest: str):
    """(source name, bytes or None, why not) from Redis, then CouchDB; raw, checked by the caller."""
    from redis.exceptions import RedisError

    from trustmesh.stores.redis_client import client

    redis = client(where.redis, socket_timeout=10, socket_connect_timeout=5)
    try:
        data = await redis.get(f"blob_{digest}")
        yield "Redis", data, None if data is not None else "no copy (expired, flushed or never stored)"
    except (RedisError, OSError) as exc:
        yield "Redis", None, f"unreachable at {_redacted(where.redis)} ({exc})"
    finally:
        await redis.aclose()
    if not where.couch:
        yield "CouchDB", None, "no CouchDB URL (--couch or COUCHDB_URL)"
        return
    import aiohttp

    from trustmesh.stores.couch import CouchClient, CouchError, CouchHistory

    async with CouchClient(where.couch, user=where.couch_user, password=where.couch_password, timeout=30) as couch:
        history = CouchHistory(couch)
        try:
            data = await couch.get_attachment(history.db, history.round_doc_id(workflow_id, number), "global_model")
            yield "CouchDB", data, None if data is not None else "no copy in the round's history document"
        except (CouchError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            yield "CouchDB", None, f"unreachable at {_redacted(where.couch)} ({exc})"


def _redacted(url: str) -> str:
    from yarl import URL

    try:
        parsed = URL(url)
    except ValueError:
        return url
    return str(parsed.with_password("***")) if parsed.password else url


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def export(where: network.Endpoints, workflow_id: str, number: int | None, out: pathlib.Path,
                 warn=_stderr) -> dict:
    from trustmesh.fl import model_format

    suffix = _suffix(str(out), "-o")
    if not out.parent.is_dir():
        raise ModelCommandError(f"-o {out}: the folder {out.parent} does not exist")
    async with network.command_rest_client(where.rest) as rest:
        number, result, spec, head = await _global_model(rest, workflow_id, number)
    digest = result["global_model_digest"]
    refused = []
    async with contextlib.aclosing(_copies(where, workflow_id, number, digest)) as copies:
        async for source, blob, why in copies:
            if blob is None:
                refused.append(f"{source}: {why}")
                continue
            try:
                loaded = model_format.load(blob, digest, spec, workflow_id=workflow_id, round=number)
            except model_format.ModelFormatError as exc:
                refused.append(f"{source}: {exc}")
                warn(f"refused the copy in {source}: {exc}")
                continue
            _write(out, suffix, blob, loaded.state)
            return {"workflow_id": workflow_id, "round": number, "digest": digest, "source": source,
                    "file": str(out), "format": suffix[1:], "bytes": out.stat().st_size, "head": head,
                    "final": bool(result.get("final"))}
    raise ModelCommandError(f"no copy of round {number}'s global model matches its on-chain digest {digest[:16]}…; "
                            f"nothing written. " + "; ".join(refused))


def _write(out: pathlib.Path, suffix: str, blob: bytes, state: Mapping) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if suffix == ".safetensors":
            tmp.write_bytes(blob)
        else:
            import torch

            torch.save(OrderedDict((name, tensor.clone()) for name, tensor in state.items()), tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise ModelCommandError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ evaluate


def mlp_spec(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The MLP spec whose state has these tensor shapes; ModelCommandError for anything else."""
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        match = _LAYER.match(name)
        if not match:
            raise ModelCommandError(f"tensor {name!r} is not an MLP layer (layers.N.weight / layers.N.bias): this "
                                    f"file holds another kind of model")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = tuple(shape)
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ModelCommandError("the file holds no consecutive MLP layers layers.0 … layers.N")
    widths = []
    for i in range(len(layers)):
        weight, bias = layers[i].get("weight"), layers[i].get("bias")
        if weight is None or bias is None or len(weight) != 2 or bias != (weight[0],):
            raise ModelCommandError(f"layer {i} needs a 2-d weight and a bias of its output size; got weight "
                                    f"{weight}, bias {bias}")
        if i and weight[1] != widths[-1]:
            raise ModelCommandError(f"layer {i} takes {weight[1]} inputs but layer {i - 1} gives {widths[-1]}")
        if not i:
            widths.append(weight[1])
        widths.append(weight[0])
    return {"type": "mlp", "input_dim": widths[0], "hidden": widths[1:-1], "num_classes": widths[-1]}


def _safetensors_shapes(blob: bytes, path: str) -> dict[str, tuple[int, ...]]:
    if len(blob) < 8:
        raise ModelCommandError(f"{path} is {len(blob)} bytes: not a safetensors file")
    (size,) = struct.unpack_from("<Q", blob)
    try:
        header = json.loads(blob[8:8 + size].decode("ascii")) if 8 + size <= len(blob) else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise ModelCommandError(f"{path} is not a safetensors file (no readable JSON header)")
    return {k: tuple(v.get("shape", ())) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def load_model_file(path: str) -> tuple[dict, Mapping, dict]:
    """(spec, state, metadata) of a .safetensors (canonical TrustMesh) or .pt (state_dict) file."""
    from trustmesh.fl import model_format

    suffix = _suffix(path, "FILE")
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ModelCommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    if suffix == ".safetensors":
        spec = mlp_spec(_safetensors_shapes(data, path))
        try:
            loaded = model_format.load(data, model_format.digest(data), spec)
        except model_format.SpecMismatchError as exc:
            raise ModelCommandError(f"{path}: its metadata names another model spec than the MLP its tensors "
                                    f"describe ({exc})") from None
        except model_format.ModelFormatError as exc:
            raise ModelCommandError(f"{path}: {exc}") from None
        return spec, loaded.state, {"workflow_id": loaded.workflow_id, "round": loaded.round,
                                    "sha256": model_format.digest(data)}
    import pickle

    import torch

    from trustmesh.fl.models import StateMismatchError, check_state

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelCommandError(f"{path} is not a PyTorch state_dict file ({first})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelCommandError(f"{path} holds a {type(state).__name__}, not a state_dict (name -> tensor)")
    spec = mlp_spec({k: tuple(v.shape) for k, v in state.items()})
    try:
        state = check_state(spec, {k: v.to(torch.float32) for k, v in state.items()})
    except StateMismatchError as exc:
        raise ModelCommandError(f"{path}: {exc}") from None
    return spec, state, {}


def evaluate(path: str, data_path: str) -> dict:
    from trustmesh.fl import datasets, training

    spec, state, metadata = load_model_file(path)
    try:
        data = datasets.load_npz(data_path, input_dim=spec["input_dim"], num_classes=spec["num_classes"])
    except datasets.DataError as exc:
        raise ModelCommandError(f"--data {exc}") from None
    scores = training.evaluate(spec, state, data.x, data.y)
    return {"file": path, "data": data_path, "model": spec, **metadata, **scores}


# ------------------------------------------------------------------------------ commands


def _round(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a round number from 1, got {text!r}")
    return int(text)


def _run(command: str, args: argparse.Namespace, work: Callable[[], dict], summary: Callable[[dict], str]) -> int:
    """A `trustmesh model` command: its result as JSON with --json, else in words; exit 2 with one
    line on stderr when it cannot be done."""
    try:
        done = work()
    except ModelCommandError as exc:
        print(f"trustmesh model {command}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(done, indent=2) if args.json else summary(done))
    return 0


def run_export(args: argparse.Namespace) -> int:
    def work():
        return asyncio.run(export(network.from_args(args), args.workflow, args.round, pathlib.Path(args.output)))

    def summary(done):
        return (f"exported round {done['round']} of {done['workflow_id']}{'' if done['final'] else ' (not final yet)'} "
                f"to {done['file']} ({done['format']}, {done['bytes']:,} bytes): sha256 {done['digest']} read from "
                f"{done['source']}, verified against the chain")

    return _run("export", args, work, summary)


def run_evaluate(args: argparse.Namespace) -> int:
    def summary(scores):
        origin = (f" (workflow {scores['workflow_id']}, round {scores['round']})" if "workflow_id" in scores else "")
        model = scores["model"]
        return (f"{args.file}{origin}: mlp {model['input_dim']}→{'→'.join(map(str, model['hidden']))}"
                f"{'→' if model['hidden'] else ''}{model['num_classes']}\n"
                f"accuracy {scores['accuracy']:.4f} · loss {scores['loss']:.4f} · {scores['samples']} samples of "
                f"{args.data}")

    return _run("evaluate", args, lambda: evaluate(args.file, args.data), summary)


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="get a global model out (verified against the chain), evaluate one")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    export_parser = sub.add_parser("export", help="write a round's global model to FILE (.safetensors or .pt), "
                                                  "after checking it against the on-chain digest")
    export_parser.add_argument("workflow", metavar="WORKFLOW", help="workflow_id")
    export_parser.add_argument("--round", type=_round, metavar="N", help="default: the latest round with a result")
    export_parser.add_argument("-o", "--output", required=True, metavar="FILE",
                               help=".safetensors (the stored bytes, their sha256 the on-chain digest) or .pt "
                                    "(a torch state_dict)")
    export_parser.add_argument("--json", action="store_true", help="machine-readable")
    network.add_endpoint_flags(export_parser, ("rest", "redis", "couch"))
    export_parser.set_defaults(func=run_export)
    evaluate_parser = sub.add_parser("evaluate", help="accuracy and loss of a model file on an .npz data set")
    evaluate_parser.add_argument("file", metavar="FILE", help=".safetensors or .pt model file")
    evaluate_parser.add_argument("--data", required=True, metavar="FILE.npz",
                                 help="x (float32 [n, features]) and y (int64 [n])")
    evaluate_parser.add_argument("--json", action="store_true", help="machine-readable")
    evaluate_parser.set_defaults(func=run_evaluate)
