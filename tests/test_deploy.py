"""deploy/: every manifest parses and carries the fields its tool needs, and they agree with dopd's defaults."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from dopd.common.config import MetricsConfig
from dopd.common.load import load_config
from dopd.dashboards.build import OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRICS_PORT = MetricsConfig().port


def docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]


def one(rel: str, kind: str) -> dict:
    found = [d for d in docs(rel) if d.get("kind") == kind]
    assert len(found) == 1, f"{rel}: expected one {kind}, found {len(found)}"
    return found[0]


def test_every_yaml_and_json_file_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json")]
    assert len(files) >= 7, files
    for p in files:
        text = p.read_text()
        loaded = json.loads(text) if p.suffix == ".json" else [d for d in yaml.safe_load_all(text) if d is not None]
        assert loaded, f"{p} is empty"


def test_compose_services():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prometheus", "grafana"} <= services.keys()
    for name, svc in services.items():
        assert re.match(r"^[\w./-]+:[\w.-]+$", svc["image"]), f"{name}: pin an image tag"
        assert svc["ports"] and svc["volumes"], name
        for port in svc["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on loopback only, not {port}"
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    # Every relative bind mount exists (named volumes and ${...}/absolute paths are created at run time).
    for name, svc in services.items():
        for vol in svc["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
    assert any("host-gateway" in h for h in services["prometheus"]["extra_hosts"])


def _mounts(svc: dict) -> dict[str, Path]:
    """container path -> host path (relative to deploy/) of the service's relative bind mounts."""
    out = {}
    for vol in svc["volumes"]:
        parts = vol.split(":")
        if parts[0].startswith("."):
            out[parts[1]] = (DEPLOY / parts[0]).resolve()
    return out


def test_grafana_provisioning_loads_the_generated_dashboards():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = _mounts(compose["services"]["grafana"])
    assert mounts["/etc/grafana/provisioning"] == (DEPLOY / "grafana" / "provisioning").resolve()

    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dopd.yml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["name"]
    host_dir = mounts[provider["options"]["path"]]  # the provider's folder is a mount of the repo's dashboards/
    assert host_dir == (ROOT / "dashboards").resolve()
    for name in OUTPUTS:
        dash = json.loads((host_dir / name).read_text())
        assert dash["uid"] and dash["title"].startswith("dopd")

    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"  # the compose service name and its port


def test_compose_prometheus_config():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = _mounts(compose["services"]["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == (DEPLOY / "prometheus/prometheus.yml").resolve()
    cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"dopd", "ray"}
    dopd_files = jobs["dopd"]["file_sd_configs"][0]["files"]
    assert dopd_files == ["/etc/prometheus/dopd_targets/*.json"]
    target_mount = [v for v in compose["services"]["prometheus"]["volumes"] if ":/etc/prometheus/dopd_targets" in v]
    assert target_mount and "prometheus/prom_targets" in target_mount[0]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/ray-temp/prom_metrics_service_discovery.json"]
    ray_mount = [v for v in compose["services"]["prometheus"]["volumes"] if v.endswith(":/ray-temp:ro")]
    assert ray_mount == ["${DOPD_RAY_TEMP:-/tmp/ray}:/ray-temp:ro"]  # the head's temp dir, as `cluster up` names it
    (relabel,) = jobs["dopd"]["relabel_configs"]
    assert re.sub(relabel["regex"], relabel["replacement"].replace("$1", r"\1"), f"127.0.0.1:{METRICS_PORT}") == (
        f"host.docker.internal:{METRICS_PORT}"
    )


def test_promtool_accepts_the_compose_config():
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Prometheus: apt-get install prometheus"
    r = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _head_and_workers(spec: dict) -> tuple[dict, list[dict]]:
    return spec["headGroupSpec"], spec["workerGroupSpecs"]


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    head, workers = _head_and_workers(spec)
    assert spec["rayVersion"] == "2.60.0", where
    (head_c,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_c["ports"]}
    assert ports["dopd-metrics"] == METRICS_PORT, f"{where}: driver metrics port must be MetricsConfig().port"
    assert ports["metrics"] == int(head["rayStartParams"]["metrics-export-port"]) == 8080
    assert {"as-metrics", "dash-metrics", "dashboard", "gcs-server"} <= ports.keys()
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    assert workers, where
    for group in workers:
        (c,) = group["template"]["spec"]["containers"]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and int(group["rayStartParams"]["num-gpus"]) == gpus, f"{where}: {group['groupName']}"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == 8080
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        assert group["replicas"] >= 1 and c["image"] == head_c["image"]
    for tmpl in [head["template"]] + [g["template"] for g in workers]:
        assert tmpl["metadata"]["labels"]["app.kubernetes.io/name"] == "dopd"  # what the PodMonitors select


def test_raycluster():
    rc = one("kuberay/raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_ray_cluster_spec(rc["spec"], "raycluster.yaml")


def test_rayjob_runs_dopd_train_with_its_config(tmp_path):
    job = one("kuberay/rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    entry = job["spec"]["entrypoint"]
    assert "dopd train --actors 16 --learners 4" in entry
    config_path = entry.split("--config", 1)[1].split()[0].rstrip(";")
    spec = job["spec"]["rayClusterSpec"]
    _check_ray_cluster_spec(spec, "rayjob.yaml")

    # The ConfigMap is mounted where --config points, on the head (where a Ray job's entrypoint runs).
    cm = one("kuberay/rayjob.yaml", "ConfigMap")
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head_pod["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    (vol,) = [v for v in head_pod["volumes"] if v["name"] == mount["name"]]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    fname = config_path[len(mount["mountPath"]) + 1 :]
    assert fname in cm["data"]

    # ... and it is a valid dopd config whose placement fits the GPU workers.
    (tmp_path / fname).write_text(cm["data"][fname])
    cfg = load_config(tmp_path / fname, ["cluster.actors=16", "cluster.learners=4"])
    assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == METRICS_PORT
    need = cfg.cluster.actors * cfg.cluster.actor_num_gpus + cfg.cluster.learners * cfg.cluster.learner_num_gpus
    have = sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in spec["workerGroupSpecs"])
    assert 0 < need <= have, f"placement needs {need} GPUs, the workers have {have}"


def test_podmonitors_scrape_driver_and_ray_ports():
    monitors = {d["metadata"]["name"]: d for d in docs("kuberay/prometheus-podmonitor.yaml")}
    assert all(m["apiVersion"] == "monitoring.coreos.com/v1" and m["kind"] == "PodMonitor" for m in monitors.values())
    rc = one("kuberay/raycluster.yaml", "RayCluster")["spec"]
    head_ports = {
        p["name"]: p["containerPort"] for p in rc["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    worker_ports = {p["name"] for p in rc["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"]}
    scraped = {"head": set(), "worker": set()}
    for m in monitors.values():
        sel = m["spec"]["selector"]["matchLabels"]
        assert sel["app.kubernetes.io/name"] == "dopd"
        node_type = sel["ray.io/node-type"]
        for ep in m["spec"]["podMetricsEndpoints"]:
            assert ep["port"] in (head_ports if node_type == "head" else worker_ports), ep
            scraped[node_type].add(ep["port"])
            job = [r["replacement"] for r in ep.get("relabelings", []) if r.get("targetLabel") == "job"]
            assert job == (["dopd"] if ep["port"] == "dopd-metrics" else ["ray"]), ep
    assert head_ports["dopd-metrics"] == METRICS_PORT
    assert scraped["head"] == {"dopd-metrics", "metrics", "as-metrics", "dash-metrics"}
    assert scraped["worker"] == {"metrics"}


def test_readme_mentions_the_keys_and_commands():
    """The walk-through is docs/deployment.md; deploy/README.md and the top-level README point at it."""
    assert "../docs/deployment.md" in (DEPLOY / "README.md").read_text()
    assert "docs/deployment.md" in (DEPLOY.parent / "README.md").read_text()
    text = (DEPLOY.parent / "docs" / "deployment.md").read_text()
    for needle in [
        "cluster.actors",
        "cluster.learners",
        "cluster.actor_num_gpus",
        "cluster.learner_num_gpus",
        "metrics.port",
        "metrics.host",
        "0.0.0.0",
        str(METRICS_PORT),
        "dopd train --actors 16 --learners 4 --config /config/train.yaml",
        "docker compose -f deploy/docker-compose.yml up",
        "kubectl apply -f deploy/kuberay/rayjob.yaml",
    ]:
        assert needle in text, needle


def _pod_templates(spec: dict) -> list[dict]:
    head, workers = _head_and_workers(spec)
    return [head["template"]] + [g["template"] for g in workers]


@pytest.mark.parametrize("rel", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_manifests_pass_the_kubernetes_schema(rel):
    """kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields are errors) on every core object,
    and on every pod template of the RayCluster / RayJob, checked as a core `PodTemplate`. The ray.io kinds' own
    fields are not in those schemas (KubeRay's CRD schema is not bundled): the tests above check them."""
    import kubernetes_validate as kv

    version = kv.latest_version()
    checked = 0
    for d in docs(rel):
        if d["apiVersion"].startswith("ray.io/"):
            spec = d["spec"].get("rayClusterSpec", d["spec"])
            for i, tmpl in enumerate(_pod_templates(spec)):
                pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": tmpl}
                kv.validate(pt, version, strict=True)
                checked += 1
        else:
            kv.validate(d, version, strict=True)
            checked += 1
    assert checked >= 2
    bad = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"}, "spec": {"acessModes": []}}
    with pytest.raises(kv.ValidationError):  # the checker can fail: a misspelt field is refused
        kv.validate(bad, version, strict=True)


def test_rayjob_keeps_its_results_on_a_volume_and_resumes():
    pvc = one("kuberay/rayjob.yaml", "PersistentVolumeClaim")
    job = one("kuberay/rayjob.yaml", "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (results,) = [v for v in head["volumes"] if v["name"] == "results"]
    assert results["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"] and "emptyDir" not in results
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "results"]
    cm = one("kuberay/rayjob.yaml", "ConfigMap")
    train = yaml.safe_load(cm["data"]["train.yaml"])
    assert train["out_dir"].startswith(mount["mountPath"] + "/")
    assert train["learner"]["checkpoint_every"] <= train["learner"]["steps"]  # something to resume from
    entry = job["spec"]["entrypoint"]
    assert f"--resume {train['out_dir']}" in entry and f"[ -f {train['out_dir']}/config.yaml ]" in entry
    # the script runs: without a config.yaml it starts the run, with one it resumes (dopd replaced by echo)
    script = entry.split("bash -c ", 1)[1].strip().strip("'").replace("exec dopd", "echo dopd")
    for exists in (False, True):
        root = Path(tempfile.mkdtemp())
        if exists:
            (root / "config.yaml").write_text("{}")
        out = subprocess.run(
            ["bash", "-c", script.replace(train["out_dir"], str(root))], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert ("--resume" in out.stdout) == exists and ("--config" in out.stdout) != exists


def test_rayjob_uses_the_gpu_presets_budget(tmp_path):
    """The job's train.yaml is the GPU preset of `dopd-experiments plateau` (data, schedule, learning rates)."""
    from dopd.experiments.plateau import PRESETS

    gpu = PRESETS["gpu"]
    cm = one("kuberay/rayjob.yaml", "ConfigMap")
    (tmp_path / "train.yaml").write_text(cm["data"]["train.yaml"])
    cfg = load_config(tmp_path / "train.yaml").to_dict()
    preset = load_config(None, gpu.overrides + gpu.drafters["eagle3"]).to_dict()
    for o in gpu.overrides + gpu.drafters["eagle3"]:
        key = o.split("=", 1)[0]
        if key == "learner.checkpoint_every":  # the job checkpoints (to resume); the experiment does not
            continue
        sec, name = key.split(".")
        assert cfg[sec][name] == preset[sec][name], key
    assert cfg["sft"]["warmup_steps"] == gpu.warmup_steps
    assert cfg["learner"]["steps"] == gpu.arm_steps
    assert cfg["model"]["device"] == "cuda" and cfg["model"]["target"] != "tiny-random-llama"


def test_dockerfile_bakes_the_model_and_prompts():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ENV DOPD_CACHE=" in text
    assert "dopd models pull smollm2-135m" in text and "load_examples(n) for n in BUILTIN_SETS" in text
    for rel in ("kuberay/rayjob.yaml", "kuberay/raycluster.yaml"):
        spec = one(rel, "RayJob" if "job" in rel else "RayCluster")["spec"]
        spec = spec.get("rayClusterSpec", spec)
        for tmpl in _pod_templates(spec):
            env = {e["name"]: e.get("value") for e in tmpl["spec"]["containers"][0].get("env", [])}
            assert env.get("HF_HUB_OFFLINE") == "1", f"{rel}: pods must not download at run time"


@pytest.mark.parametrize("rel", ["docker-compose.yml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_no_manifest_exposes_unpinned_latest_images(rel):
    text = (DEPLOY / rel).read_text()
    assert ":latest" not in text
