"""Child process of test_torch_state.py: resume saved runs on freshly built parameters.

    python torch_resume_child.py FOLDER START STOP KIND...

reads ``FOLDER/KIND.pt`` and writes ``FOLDER/KIND.resumed.pt`` for each kind.
"""

import sys
from pathlib import Path

import torch
from torch_helpers import resume_setup, resume_steps, snapshot

folder, start, stop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for kind in sys.argv[4:]:
    problem, params, opt, scheduler = resume_setup(kind)
    saved = torch.load(folder / f"{kind}.pt", weights_only=True)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved["params"][n])
    opt.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    resume_steps(problem, params, opt, scheduler, start, stop)
    torch.save(snapshot(params, opt), folder / f"{kind}.resumed.pt")
