"""The deployment files, checked offline: the compose file wires what the
deployment needs, nginx and Prometheus accept their configs (and nginx, run
on loopback, gives a request it gave up on a second round of tries), the
Kubernetes manifests validate against the API schemas, and every query of
the Grafana dashboard asks for a metric that a running carpool exports."""

from __future__ import annotations

import json
import re
import socketserver
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy.local.load import BODY, PATH
from deploy.local.topology import find, free_port, get, render_nginx, render_prometheus
from server.settings import Settings
from tests.servers import ROOT, in_thread

DEPLOY = ROOT / "deploy"
NGINX_CONF = (DEPLOY / "nginx" / "nginx.conf").read_text()
PROMETHEUS_YML = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "carpool.json").read_text())
_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    """docker-compose.yml as compose reads it with no variables set."""
    text = (ROOT / "docker-compose.yml").read_text()
    return yaml.safe_load(_DEFAULT.sub(lambda match: match.group(1), text))  # type: ignore[no-any-return]


def seconds(duration: str) -> float:
    """A compose duration such as "1m30s" or "30s", in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def nginx_directive(name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]*);", NGINX_CONF, re.MULTILINE)


# docker-compose.yml


def test_compose_runs_carpool_nginx_prometheus_and_grafana() -> None:
    assert set(compose()["services"]) == {"carpool", "nginx", "prometheus", "grafana"}


def test_compose_runs_several_carpool_replicas_of_one_process_each() -> None:
    carpool = compose()["services"]["carpool"]
    assert carpool["deploy"]["replicas"] >= 2
    assert "command" not in carpool  # the image's one `carpool serve`, no --workers


def test_compose_stop_grace_period_outlasts_the_drain_timeout_with_margin() -> None:
    carpool = compose()["services"]["carpool"]
    drain = float(carpool["environment"]["CARPOOL_DRAIN_TIMEOUT"])
    delay = float(carpool["environment"].get("CARPOOL_DRAIN_DELAY", 0))
    assert seconds(carpool["stop_grace_period"]) >= delay + drain + 5
    assert carpool.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_publishes_only_nginx_and_grafana_and_only_on_loopback() -> None:
    services = compose()["services"]
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert set(published) == {"nginx", "grafana"}
    for ports in published.values():
        assert all(str(port).startswith("127.0.0.1:") for port in ports), ports


def test_compose_checks_carpool_health_on_readiness() -> None:
    test = compose()["services"]["carpool"]["healthcheck"]["test"]
    assert "/v2/health/ready" in " ".join(test)


def test_compose_mounts_the_deploy_files_at_the_paths_each_image_reads() -> None:
    spec = compose()
    files = {name: config["file"] for name, config in spec["configs"].items()}
    for path in files.values():
        assert (ROOT / path).is_file(), path
    mounted = {
        (service, mount["target"]): files[mount["source"]]
        for service, body in spec["services"].items()
        for mount in body.get("configs", [])
    }
    assert mounted[("nginx", "/etc/nginx/nginx.conf")] == "./deploy/nginx/nginx.conf"
    assert mounted[("prometheus", "/etc/prometheus/prometheus.yml")].endswith("prometheus.yml")
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "carpool.yml")
    dashboards = provider["providers"][0]["options"]["path"]
    assert mounted[("grafana", f"{dashboards}/carpool.json")].endswith("carpool.json")


def test_compose_file_stays_in_the_format_docker_stack_deploy_reads() -> None:
    spec = compose()
    assert str(spec["version"]).startswith("3.")
    assert "name" not in spec  # stack deploy refuses a top-level name
    for service in spec["services"].values():
        assert isinstance(service.get("depends_on", []), list)  # no long form
    carpool = spec["services"]["carpool"]["deploy"]
    assert carpool["endpoint_mode"] == "dnsrr"  # one DNS record per replica, no VIP
    assert carpool["update_config"]["order"] == "start-first"


def test_compose_nginx_image_supports_resolve_on_upstream_servers() -> None:
    image = compose()["services"]["nginx"]["image"]
    version = tuple(int(n) for n in re.findall(r":(\d+)\.(\d+)", image)[0])
    assert version >= (1, 28)  # `server ... resolve` is open source from 1.27.3


# nginx


def test_nginx_balances_on_least_connections_with_keepalive_to_the_replicas() -> None:
    upstream = re.search(r"upstream carpool \{(.*?)\n    \}", NGINX_CONF, re.DOTALL)
    assert upstream is not None
    assert re.search(r"^\s*least_conn;", upstream.group(1), re.MULTILINE)
    assert re.search(r"^\s*keepalive \d+;", upstream.group(1), re.MULTILINE)
    assert re.search(r"^\s*server carpool:8000 resolve\b", upstream.group(1), re.MULTILINE)
    assert nginx_directive("proxy_http_version") == ["1.1"]
    assert nginx_directive("proxy_set_header Connection") == ["$carpool_connection"]


def test_nginx_retries_connection_errors_and_503_on_another_replica_a_bounded_number_of_times() -> (
    None
):
    (retry,) = nginx_directive("proxy_next_upstream")
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry.split())
    (tries,) = nginx_directive("proxy_next_upstream_tries")
    assert 2 <= int(tries) <= 3
    (timeout,) = nginx_directive("proxy_next_upstream_timeout")
    assert 0 < seconds(timeout) <= 10


def test_nginx_limits_bodies_and_slow_clients() -> None:
    (body,) = nginx_directive("client_max_body_size")
    assert int(body.removesuffix("m")) * 2**20 > Settings().max_body_bytes
    assert nginx_directive("client_header_timeout") == ["10s"]
    assert nginx_directive("client_body_timeout") == ["10s"]
    (read,) = nginx_directive("proxy_read_timeout")
    assert seconds(read) >= 30


def test_nginx_passes_a_request_id_to_carpool_and_back() -> None:
    assert nginx_directive("proxy_set_header X-Request-ID") == ["$carpool_request_id"]
    assert "$carpool_request_id always" in " ".join(nginx_directive("add_header X-Request-ID"))


def test_rendered_nginx_lists_every_loopback_replica_and_keeps_the_rest(tmp_path: Path) -> None:
    replicas = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
    config = render_nginx(NGINX_CONF, replicas, "127.0.0.1:9000", tmp_path)
    for replica in replicas:
        assert f"server {replica} max_fails=1 fail_timeout=2s;" in config
    assert "carpool:8000" not in config
    assert "listen 127.0.0.1:9000;" in config
    assert "/var/log/nginx" not in config
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in config


def test_rendering_nginx_refuses_a_template_it_does_not_recognise(tmp_path: Path) -> None:
    changed = NGINX_CONF.replace("upstream carpool {", "upstream replicas {")
    with pytest.raises(ValueError, match="upstream carpool"):
        render_nginx(changed, ["127.0.0.1:9001"], "127.0.0.1:9000", tmp_path)


@pytest.mark.skipif(find("nginx") is None, reason="nginx not installed")
def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(render_nginx(NGINX_CONF, ["127.0.0.1:9001"], "127.0.0.1:9000", tmp_path))
    check = subprocess.run(
        [
            *(str(find("nginx")), "-t", "-p", f"{tmp_path}/", "-c", str(config)),
            *("-e", str(tmp_path / "e.log"), "-g", f"pid {tmp_path / 'nginx.pid'};"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr


class HangsUp(socketserver.ThreadingTCPServer):
    """A replica on loopback that hangs up, unanswered, on the first ``drops``
    requests it reads, and answers each later one 200 with the body it got."""

    daemon_threads = True

    def __init__(self, drops: int) -> None:
        super().__init__(("127.0.0.1", 0), _HangsUpHandler)
        self.drops = drops
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _HangsUpHandler(socketserver.StreamRequestHandler):
    server: HangsUp

    def handle(self) -> None:
        head = b""
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            head += line
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        body = self.rfile.read(int(length.group(1))) if length else b""
        with self.server.lock:
            self.server.bodies.append(body)
            if len(self.server.bodies) <= self.server.drops:
                return  # the connection closes without an answer
        answer = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        self.wfile.write(answer.encode() + body)


@contextmanager
def nginx_in_front_of(replica: HangsUp, workdir: Path) -> Iterator[str]:
    """Debian's nginx running the rendered nginx.conf, ``replica`` its one
    upstream server: yields nginx's URL once it answers."""
    with replica:
        serving = threading.Thread(target=replica.serve_forever, daemon=True)
        serving.start()
        url = f"http://127.0.0.1:{free_port()}"
        config = workdir / "nginx.conf"
        config.write_text(render_nginx(NGINX_CONF, [replica.address], url[7:], workdir))
        nginx = subprocess.Popen(
            [
                *(str(find("nginx")), "-p", f"{workdir}/", "-c", str(config)),
                *("-e", str(workdir / "error.log")),
                *("-g", f"daemon off; pid {workdir / 'nginx.pid'};"),
            ]
        )
        try:
            deadline = time.monotonic() + 30
            while get(url + "/metrics")[0] != 404:  # nginx's own answer, not the replica's
                if nginx.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nginx did not start: {(workdir / 'error.log').read_text()}"
                    )
                time.sleep(0.05)
            yield url
        finally:
            nginx.terminate()
            nginx.wait(30)
            replica.shutdown()
            serving.join(30)


@pytest.mark.skipif(find("nginx") is None, reason="nginx not installed")
def test_nginx_sends_a_request_it_gave_up_on_to_the_replicas_once_more(tmp_path: Path) -> None:
    # One replica, one try a round: the hang-up ends the first round, as a
    # changed address list ends nginx's retries under `resolve`.
    replica = HangsUp(drops=1)
    with nginx_in_front_of(replica, tmp_path) as url:
        answer = httpx.post(url + PATH, content=BODY, headers={"content-type": "application/json"})
    assert answer.status_code == 200
    assert answer.content == BODY
    assert replica.bodies == [BODY, BODY]  # the POST's body went again, whole


@pytest.mark.skipif(find("nginx") is None, reason="nginx not installed")
def test_nginx_answers_its_json_502_when_the_second_round_fails_too(tmp_path: Path) -> None:
    replica = HangsUp(drops=10)
    with nginx_in_front_of(replica, tmp_path) as url:
        answer = httpx.post(url + PATH, content=BODY, headers={"content-type": "application/json"})
    assert answer.status_code == 502
    assert "no carpool replica answered" in answer.json()["error"]
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["x-request-id"]
    assert len(replica.bodies) == 2  # two rounds, never more


# Prometheus


def test_prometheus_discovers_every_carpool_replica_on_its_port() -> None:
    (job,) = yaml.safe_load(PROMETHEUS_YML)["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["carpool"]
    assert str(discovery["port"]) == compose()["services"]["carpool"]["environment"]["CARPOOL_PORT"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.skipif(find("promtool") is None, reason="prometheus not installed")
@pytest.mark.parametrize("rendered", [False, True], ids=["compose", "loopback"])
def test_prometheus_accepts_its_config(tmp_path: Path, rendered: bool) -> None:
    config = tmp_path / "prometheus.yml"
    text = render_prometheus(PROMETHEUS_YML, ["127.0.0.1:9001"], "1s") if rendered else None
    config.write_text(text or PROMETHEUS_YML)
    check = subprocess.run(
        [str(find("promtool")), "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# Kubernetes


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_k8s_manifests_validate_against_the_api_schemas(version: str) -> None:
    check = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version]
        + [str(path) for path in K8S],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("passed") == len(K8S)


def k8s(kind: str) -> dict[str, Any]:
    (manifest,) = [m for m in map(load_yaml, K8S) if m["kind"] == kind]
    return manifest  # type: ignore[no-any-return]


def carpool_container() -> dict[str, Any]:
    (container,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_k8s_grace_period_covers_the_prestop_sleep_the_drain_and_a_margin() -> None:
    container = carpool_container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    env = {item["name"]: item["value"] for item in container["env"]}
    drain = float(env["CARPOOL_DRAIN_TIMEOUT"])
    delay = float(env.get("CARPOOL_DRAIN_DELAY", 0))
    grace = k8s("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop >= 10
    assert grace >= pre_stop + delay + drain + 5


def test_k8s_probes_ask_readiness_liveness_and_allow_for_model_loading() -> None:
    container = carpool_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_k8s_service_selects_the_deployments_pods() -> None:
    pods = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = k8s("Service")["spec"]["selector"]
    assert selector.items() <= pods.items()


def test_k8s_hpa_scales_the_deployment_on_queue_depth_from_the_prometheus_adapter() -> None:
    hpa = k8s("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == k8s("Deployment")["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "carpool_queue_depth"
    adapter = load_yaml(DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml")
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert "carpool_queue_depth" in served


def test_k8s_pods_run_as_a_non_root_user() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0


# Dockerfile


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_runs_as_a_non_root_user() -> None:
    final_stage = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.MULTILINE)
    assert users
    assert users[-1] not in {"root", "0", "0:0"}


def test_dockerfile_health_is_readiness() -> None:
    (healthcheck,) = re.findall(r"^HEALTHCHECK .*?(?<!\\)\n", DOCKERFILE, re.MULTILINE | re.DOTALL)
    assert "/v2/health/ready" in healthcheck


def test_dockerfile_builds_a_cuda_variant_from_a_build_argument() -> None:
    assert re.search(r"^ARG TORCH_INDEX=\S*/whl/cpu$", DOCKERFILE, re.MULTILINE)
    assert '--index-url "${TORCH_INDEX}"' in DOCKERFILE


def test_dockerignore_lets_through_every_package_the_image_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {name.partition(".")[0] for name in project["tool"]["setuptools"]["packages"]}
    allowed = set((ROOT / ".dockerignore").read_text().split())
    assert {"!pyproject.toml", "!README.md", "!weights/"} <= allowed
    assert {f"!{name}/" for name in top_level} <= allowed


def test_dockerfile_carries_the_weights_and_runs_one_server_process() -> None:
    assert re.search(r"^COPY weights /models$", DOCKERFILE, re.MULTILINE)
    assert re.findall(r"^CMD (.*)$", DOCKERFILE, re.MULTILINE) == ['["carpool", "serve"]']


# Grafana


_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_NOT_METRICS |= {"unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (or a Grafana
    ``label_values(metric, label)`` variable query)."""
    variable = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,.*\)\s*", expr)
    if variable:
        return {variable.group(1)}
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    words = re.findall(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {word for word in words if word.lower() not in _NOT_METRICS}


def test_metric_names_skips_functions_labels_keywords_and_numbers() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model"}[5m])))'
        " / on (model) group_left b_total + ignoring (x) c or vector(0) > bool 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert metric_names("label_values(carpool_model_ready, model)") == {"carpool_model_ready"}


def dashboard_queries() -> list[str]:
    queries = [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]
    for variable in DASHBOARD["templating"]["list"]:
        query = variable["query"]
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every metric name a running carpool exports, after one request."""
    models = tmp_path_factory.mktemp("models")
    (models / "digits").symlink_to(ROOT / "weights" / "digits")
    with in_thread(Settings(models_dir=models, torch_threads=1)) as running:
        assert httpx.post(running.url + PATH, content=BODY).status_code == 200
        text = httpx.get(running.url + "/metrics").text
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [])}
    return names


def test_every_dashboard_query_reads_only_metrics_carpool_exports(exported: set[str]) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= exported, (
            f"{query!r} reads {names - exported}, which carpool does not export"
        )


def test_the_dashboard_shows_throughput_latency_queue_batch_size_errors_and_dropped() -> None:
    titles = " ".join(panel["title"].lower() for panel in DASHBOARD["panels"])
    for topic in ("throughput", "p50", "p99", "queue depth", "batch size", "errors", "dropped"):
        assert topic in titles, topic


def test_the_dashboard_queries_the_provisioned_prometheus() -> None:
    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (prometheus,) = datasources["datasources"]
    assert prometheus["url"] == "http://prometheus:9090"
    uids = {panel["datasource"]["uid"] for panel in DASHBOARD["panels"]}
    assert uids == {prometheus["uid"]}


def test_compose_sets_only_carpool_settings_that_exist() -> None:
    fields = {f"CARPOOL_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert set(compose()["services"]["carpool"]["environment"]) <= fields
