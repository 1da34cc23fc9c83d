import re

import pytest
import yaml

from scenarios.classify import Classifier, NoScenario, RequestInfo
from scenarios.spec import SpecError, load_specs, parse_specs

GOOD = """
scenarios:
  - name: chat
    model: llama3-8b
    match: {tags: [chat], max_prompt_tokens: 8192}
    slo: {ttft_s: 2.0, tpot_s: 0.05, percentile: 90}
    hardware: {prefill: {accelerator: h100, num_gpus: 1}, decode: {accelerator: h100, num_gpus: 1}}
    prefill: 2
    decode: 2
    limits: {prefill: {min: 1, max: 6}, decode: {min: 1, max: 6}}
    priority: 1
  - name: long
    model: llama3-8b
    match: {min_prompt_tokens: 8192}
    slo: {ttft_s: 8.0, tpot_s: 0.1}
  - name: code
    model: llama3-8b
    match: {prefix: "def "}
    slo: {ttft_s: 1.0, tpot_s: 0.05}
"""


def test_good_file_loads_and_classifies(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    specs = load_specs(path)
    assert [s.name for s in specs] == ["chat", "long", "code"]
    assert specs[0].limits["decode"].max == 6 and specs[1].limits["prefill"].min == 1
    c = Classifier(specs)
    assert c.classify(RequestInfo(100, tags=("chat",))) == "chat"
    assert c.classify(RequestInfo(9000, tags=("chat",))) == "long"
    assert c.classify(RequestInfo(100, prompt_text="def f():")) == "code"
    with pytest.raises(NoScenario, match="no scenario matches"):
        c.classify(RequestInfo(100))
    with pytest.raises(NoScenario):
        c.classify(RequestInfo(9000, model="other"))


@pytest.mark.parametrize("text, message", [
    ("scenarios: [", "not valid YAML"),
    ("foo: 1", "non-empty list under 'scenarios:'"),
    ("scenarios:\n  - {name: a, model: m}", "scenario a: slo: Field required"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: -1, tpot_s: 0.1}}", "slo.ttft_s"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, colour: red}", "colour: Extra inputs"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, prefill: 9,"
     " limits: {prefill: {max: 4}}}", "initial prefill count 9 is outside its limits [1, 4]"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1},"
     " limits: {decode: {min: 5, max: 2}}}", "min (5) is above max (2)"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1},"
     " match: {min_prompt_tokens: 10, max_prompt_tokens: 5}}", "must be above min_prompt_tokens"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}}\n"
     "  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}}", "repeated: a"),
    ("scenarios:\n  - {name: 'a b', model: m, slo: {ttft_s: 1, tpot_s: 0.1}}", "scenario a b: name"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, mode: split}",
     "mode: Input should be 'disaggregated', 'aggregated' or 'auto'"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, mode: aggregated, decode: 1}",
     "an aggregated scenario runs both actors only: leave out prefill and decode"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, mode: aggregated, both: 0}",
     "an aggregated scenario needs at least one actor"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, both: 2}",
     "a disaggregated scenario runs prefill and decode actors: leave out both, or set mode: aggregated"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, local_prefill_tokens: 64}",
     "local_prefill_tokens applies to mode: auto only"),
    ("scenarios:\n  - {name: a, model: m, slo: {ttft_s: 1, tpot_s: 0.1}, mode: aggregated, both: 3,"
     " limits: {both: {max: 2}}}", "initial both count 3 is outside its limits [1, 2]"),
])
def test_bad_files_name_what_to_fix(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_specs(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="cannot read scenario file .*nope.yaml"):
        load_specs(tmp_path / "nope.yaml")


def test_parse_specs_from_data():
    specs = parse_specs({"scenarios": [{"name": "x", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1}}]})
    assert specs[0].slo.percentile == 90


def test_a_scenario_matches_by_a_hash_of_the_prompts_first_blocks():
    from scenarios.classify import prefix_digest

    system = list(range(100, 164))  # a tenant's shared prompt: 4 blocks of 16 tokens
    digest = prefix_digest(system, 16, 4)
    specs = parse_specs({"scenarios": [
        {"name": "tenant", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1},
         "match": {"prefix_hash": {"block_size": 16, "blocks": 4, "hash": digest}}},
        {"name": "rest", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1}}]})
    c = Classifier(specs)
    assert c.classify(RequestInfo(70, prompt_token_ids=tuple(system + [1, 2, 3]))) == "tenant"
    other = system[:-1] + [7, 1, 2, 3]  # differs in the prefix's last token
    assert c.classify(RequestInfo(67, prompt_token_ids=tuple(other))) == "rest"
    assert c.classify(RequestInfo(63, prompt_token_ids=tuple(system[:-1]))) == "rest"  # shorter than the prefix
    assert c.classify(RequestInfo(70, prompt_text="no token ids")) == "rest"
    assert prefix_digest(system[:-1], 16, 4) is None


def test_a_prefix_hash_rule_is_checked():
    spec = {"name": "a", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1},
            "match": {"prefix_hash": {"block_size": 0, "blocks": 2, "hash": "xyz"}}}
    with pytest.raises(SpecError, match=r"match.prefix_hash.block_size.*match.prefix_hash.hash"):
        parse_specs({"scenarios": [spec]})


def test_a_text_prefix_and_a_prefix_hash_both_hold_when_both_given():
    from scenarios.classify import prefix_digest

    ids = tuple(range(8))
    rule = {"prefix": "You are", "prefix_hash": {"block_size": 4, "blocks": 2, "hash": prefix_digest(ids, 4, 2)}}
    c = Classifier(parse_specs({"scenarios": [{"name": "a", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1},
                                               "match": rule}]}))
    assert c.classify(RequestInfo(8, prompt_text="You are kind", prompt_token_ids=ids)) == "a"
    with pytest.raises(NoScenario):
        c.classify(RequestInfo(8, prompt_text="Hi", prompt_token_ids=ids))


def test_hardware_may_name_custom_ray_resources_which_reach_ray():
    """The scenario's Hardware is what its pool asks Ray for (mesh.hardware)."""
    text = GOOD.replace("decode: {accelerator: h100, num_gpus: 1}}",
                        "decode: {accelerator: h100, num_gpus: 1, resources: {pdmesh_decode: 1}}}")
    spec = parse_specs(yaml.safe_load(text))[0]
    assert spec.hardware["decode"].resources == {"pdmesh_decode": 1}
    assert spec.hardware["decode"].options() == {"num_cpus": 1, "num_gpus": 1, "resources": {"pdmesh_decode": 1}}


@pytest.mark.parametrize("resources", ["{GPU: 1}", "{pdmesh_decode: -1}"])
def test_bad_custom_resources_say_what_to_fix(resources):
    text = GOOD.replace("decode: {accelerator: h100, num_gpus: 1}}",
                        f"decode: {{accelerator: h100, resources: {resources}}}}}")
    with pytest.raises(SpecError, match="name a custom Ray resource"):
        parse_specs(yaml.safe_load(text))


def test_the_serving_mode_sets_which_actors_start():
    [split, aggregated, auto] = parse_specs({"scenarios": [
        {"name": "s", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1}},
        {"name": "a", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1}, "mode": "aggregated",
         "hardware": {"decode": {"num_gpus": 1}}},
        {"name": "c", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 0.1}, "mode": "auto", "local_prefill_tokens": 64}]})
    assert (split.mode, split.prefill, split.decode, split.both) == ("disaggregated", 1, 1, 0)
    assert "both" not in split.hardware  # a disaggregated scenario's file is read as before
    assert (aggregated.prefill, aggregated.decode, aggregated.both) == (0, 0, 1)
    assert aggregated.limits["prefill"].min == aggregated.limits["decode"].min == 0
    assert aggregated.hardware["both"].num_gpus == 1  # both actors run on the decode hardware unless told
    assert (auto.mode, auto.prefill, auto.decode, auto.local_prefill_tokens) == ("auto", 1, 1, 64)
