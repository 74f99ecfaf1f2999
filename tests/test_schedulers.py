"""Every scheduler name users pick is pinned to diffusers' own scheduler built on the checkpoint's config.

The table below is written out from diffusers' docs and the acceleration LoRAs' cards, not read from
jsd.schedulers: a name whose class, config values (``use_karras_sigmas``, ``timestep_spacing``,
``algorithm_type`` …) or step schedule drift fails here. "DPM-Solver++ 2M Karras" losing its Karras sigmas does.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from jsd.loading import load_scheduler
from jsd.schedulers import SCHEDULERS, make_scheduler, scheduler_call_kwargs

DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
EXPECTED = {
    "DPM-Solver++ 2M": (DPMSolverMultistepScheduler, DPM),
    "DPM-Solver++ 2M Karras": (DPMSolverMultistepScheduler, DPM | {"use_karras_sigmas": True}),
    "DDIM": (DDIMScheduler, {"clip_sample": False}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
    "LMS": (LMSDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler ancestral": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DEIS": (DEISMultistepScheduler, {}),
    # diffusers' LCM-LoRA and TCD docs: XScheduler.from_config(pipe.scheduler.config); Hyper-SD's card:
    # DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing").
    "LCM": (LCMScheduler, {}),
    "TCD": (TCDScheduler, {}),
    "DDIM trailing": (DDIMScheduler, {"clip_sample": False, "timestep_spacing": "trailing"}),
}
STEPS = 7


@pytest.fixture(scope="module")
def base_config(tiny_checkpoint) -> dict:
    """The checkpoint's own scheduler config (PNDM, SD v1's betas, steps_offset 1), as serving reads it."""
    return dict(load_scheduler(tiny_checkpoint / "scheduler").config)


def test_every_choice_is_in_this_table():
    assert set(SCHEDULERS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_name_is_diffusers_scheduler_with_its_config_and_steps(base_config, name):
    cls, overrides = EXPECTED[name]
    ours, theirs = make_scheduler(name, base_config), cls.from_config(base_config, **overrides)

    assert type(ours) is cls
    assert dict(ours.config) == dict(theirs.config)
    for key, value in overrides.items():  # the values that make the name, not only what the table shares with jsd
        assert ours.config[key] == value, key
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.num_train_timesteps == 1000
    ours.set_timesteps(STEPS)
    theirs.set_timesteps(STEPS)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    if hasattr(theirs, "sigmas"):
        assert torch.equal(torch.as_tensor(ours.sigmas), torch.as_tensor(theirs.sigmas))


def test_karras_sigmas_and_trailing_timesteps_are_what_the_names_say(base_config):
    karras, plain = (
        make_scheduler("DPM-Solver++ 2M Karras", base_config),
        make_scheduler("DPM-Solver++ 2M", base_config),
    )
    karras.set_timesteps(STEPS)
    plain.set_timesteps(STEPS)
    assert not torch.equal(karras.sigmas, plain.sigmas)

    trailing, leading = make_scheduler("DDIM trailing", base_config), make_scheduler("DDIM", base_config)
    trailing.set_timesteps(4)
    leading.set_timesteps(4)
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]  # Hyper-SD: start from the last training step
    assert leading.timesteps.tolist() == [751, 501, 251, 1]

    lcm = make_scheduler("LCM", base_config)
    lcm.set_timesteps(4)
    assert lcm.timesteps.tolist() == [999, 759, 499, 259]  # diffusers' LCM docs, 4 steps of 50


def test_tcd_runs_with_eta_0_3_and_the_others_with_the_pipeline_default():
    assert scheduler_call_kwargs("TCD") == {"eta": 0.3}
    assert all(scheduler_call_kwargs(name) == {} for name in EXPECTED if name != "TCD")
