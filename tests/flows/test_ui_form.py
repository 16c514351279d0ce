"""The pipeline deployment's "Custom run" form in a real browser (issue 17.4): the README's
authenticated server, `prefect deploy --all`, Debian's headless Chromium logged in as the UI does it.
Sections and fields carry their titles (no class names such as "ExtractConfig", no untitled "Field"),
the common path comes first, rarely changed settings last, and no empty optional field prints 'Property
is type "None"'; submitted untouched, the form starts a run of the deployment's defaults, every optional
field left empty arriving as its default (None). Run with -s for the form's figures."""

from __future__ import annotations

import pytest
from prefect_cluster import AUTH, free_port, readme_cluster

pytestmark = pytest.mark.slow


def test_pipeline_form_in_headless_chromium(tmp_path_factory):
    import time

    from chromium_form import chromium_page, custom_run_form, submit_form
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from egpt_core.config import PipelineConfig
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("ui-form")
    with readme_cluster(root) as cluster:
        cluster.cli("work-pool", "create", "gpu", "--type", "process")
        cluster.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        with cluster.client() as client:
            deployment = client.read_deployment_by_name("pipeline/gpu")
        with chromium_page(free_port()) as page:
            form = custom_run_form(page, cluster.api.removesuffix("/api"), AUTH, str(deployment.id),
                                   screenshot=root / "pipeline-form.png")
            submit_form(page)
            deadline, runs = time.monotonic() + 60, []
            while not runs and time.monotonic() < deadline:  # no worker: the run stays Scheduled
                time.sleep(1)
                with cluster.client() as client:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                        any_=[deployment.id])))
            after_submit = page.js("document.body.innerText") or ""
    labels = [label.removesuffix(" (Optional)") for label in form["labels"]]
    assert "Password" not in form["text"][:200] and "Parameters" in form["text"], form["text"][:500]  # logged in
    assert labels[:7] == ["Run Name", "cfg", "Extraction", "Dataset", "Drafter checkpoint", "Target checkpoint",
                          "Store"], labels[:10]
    assert not [label for label in labels if label.endswith("Config") or label == "Field"], labels
    sections = [PipelineConfig.model_fields[name].title for name in ("adapters", "lora", "out")]
    assert all(s in labels for s in sections), sections
    # rarely changed settings after the common ones, in the extraction section and the pipeline's own
    assert labels.index("Shard groups (fan-out)") < labels.index("Advanced: questions file")
    assert labels.index("Output directory") < labels.index("Advanced: test store") < labels.index("Advanced: split seed")
    # issue 17.4: each empty optional field printed 'Property is type "None"' (16 lines, 11,384 px)
    assert form["none_lines"] == 0, [line for line in form["text"].splitlines() if "None" in line]
    assert runs, f"Submit started no run; the page says: {after_submit[-1500:]}"
    [run] = runs
    cfg = pipeline.validate_parameters(run.parameters)["cfg"]  # what the form sent, as the flow reads it
    defaults = pipeline.validate_parameters(deployment.parameters)["cfg"]
    assert cfg == defaults, (run.parameters, deployment.parameters)
    assert cfg.timing is None and cfg.test_store is None and cfg.extract.max_scenes is None
    assert cfg.lora is not None and cfg.lora.store is None and cfg.speculative.load is None
    print(f"\npipeline Custom-run form: {form['height']} px, {len(labels)} fields, "
          f"{form['none_lines']} 'Property is type \"None\"' lines; screenshot {root / 'pipeline-form.png'}")
