"""The evaluation harness behind ``ifedicl eval``: the paper's tables, every baseline, one command.

Every method runs on the same Dirichlet split and the same class-balanced test
sample, so the numbers answer "does IFed-ICL beat what I would do otherwise, on
my model and my data?". Modules, one job each:

- :mod:`.settings`   what a run is (settings, cells, method names)
- :mod:`.tasks`      loading a task dir / HF dataset, the balanced test sample, the split
- :mod:`.metrics`    accuracy, macro-F1, mean ± std
- :mod:`.scoring`    turning a model (+ prompts, + injection) into metrics
- :mod:`.methods_icl`, :mod:`.methods_i2cl`, :mod:`.methods_lora`   the methods
- :mod:`.cells`      one JSON file per finished cell (what makes resume work)
- :mod:`.runner`     the loop over cells with progress bars
- :mod:`.report`     results.json and results.md
- :mod:`.plots`      the PNG figures
"""
