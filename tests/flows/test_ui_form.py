"""The pipeline deployment's "Custom run" form in a real browser (issue 17.4): the README's
authenticated server, `prefect deploy --all`, Debian's headless Chromium logged in as the UI does it.
Sections and fields carry their titles (no class names such as "ExtractConfig", no untitled "Field"),
the common path comes first, rarely changed settings last. Run with -s for the form's figures."""

from __future__ import annotations

import pytest
from prefect_cluster import AUTH, free_port, readme_cluster

pytestmark = pytest.mark.slow


def test_pipeline_form_in_headless_chromium(tmp_path_factory):
    from chromium_form import chromium_page, custom_run_form

    from egpt_core.config import PipelineConfig

    root = tmp_path_factory.mktemp("ui-form")
    with readme_cluster(root) as cluster:
        cluster.cli("work-pool", "create", "gpu", "--type", "process")
        cluster.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        with cluster.client() as client:
            deployment = client.read_deployment_by_name("pipeline/gpu")
        with chromium_page(free_port()) as page:
            form = custom_run_form(page, cluster.api.removesuffix("/api"), AUTH, str(deployment.id),
                                   screenshot=root / "pipeline-form.png")
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
    print(f"\npipeline Custom-run form: {form['height']} px, {len(labels)} fields, "
          f"{form['none_lines']} 'Property is type \"None\"' lines; screenshot {root / 'pipeline-form.png'}")
