"""The pre-flight Event: the first rendered row, once, when pre-flight passes."""

from __future__ import annotations

import json

from .test_lorajob_world import LATER, World, result, vjob, vpod

ROW = {"source": "pvc://data/train.jsonl line 1", "tokens": 25, "supervised": 8,
       "text": "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"
               "<|im_start|>assistant\n[[The sky is blue.<|im_end|>]]\n"}


def passed(rendered: list[dict[str, object]]) -> str:
    data = json.loads(result(validation=True))
    data["validation"]["rendered"] = rendered
    return json.dumps(data)


def test_a_passed_preflight_posts_its_rendered_row_once() -> None:
    world = World()
    world.step()
    world.pods.append(vpod("Succeeded", exit_code=0, message=passed([ROW, {**ROW, "source": "line 2"}])))
    world.jobs[0] = vjob(succeeded=1, condition="Complete")
    plan = world.step(LATER)
    assert plan.phase == "Running"
    assert plan.notices == (("ChatTemplate", "pvc://data/train.jsonl line 1 as trained (25 tokens, 8 supervised, "
                             "inside [[ ]]): <|im_start|>user\\nWhat colour is the sky?<|im_end|>\\n"
                             "<|im_start|>assistant\\n[[The sky is blue.<|im_end|>]]\\n"),)
    assert world.step(LATER).notices == ()


def test_no_rendered_rows_no_event() -> None:
    world = World()
    world.step()
    world.pods.append(vpod("Succeeded", exit_code=0, message=passed([])))
    world.jobs[0] = vjob(succeeded=1, condition="Complete")
    assert world.step(LATER).notices == ()
