"""Task mixing: `sample` frequencies follow the weights and agree across ranks; `sum` runs all."""
from collections import Counter

from vlpt.train.mixing import TaskMixer


def test_sample_frequencies_match_weights():
    m = TaskMixer(["itm", "mlm", "mrfr", "mrc"], [6, 8, 4, 4], "sample", seed=42)
    n = 20000
    counts = Counter(m.tasks_for(s)[0] for s in range(n))
    for name, w in zip(m.names, [6, 8, 4, 4]):
        assert abs(counts[name] / n - w / 22) < 0.01, (name, counts[name] / n)


def test_same_task_on_every_rank_and_after_resume():
    # two "ranks" build their own mixer from the same recipe: no communication needed
    a = TaskMixer(["mlm", "itm"], [1, 1], "sample", seed=7)
    b = TaskMixer(["mlm", "itm"], [1, 1], "sample", seed=7)
    assert [a.tasks_for(s) for s in range(500)] == [b.tasks_for(s) for s in range(500)]
    assert [a.tasks_for(s) for s in range(250, 500)] == [b.tasks_for(s) for s in range(250, 500)]
    c = TaskMixer(["mlm", "itm"], [1, 1], "sample", seed=8)
    assert [a.tasks_for(s) for s in range(100)] != [c.tasks_for(s) for s in range(100)]


def test_zero_weight_never_drawn_and_sum_mode():
    m = TaskMixer(["a", "b"], [1, 0], "sample", seed=0)
    assert {m.tasks_for(s)[0] for s in range(300)} == {"a"}
    s = TaskMixer(["a", "b", "c"], [2, 1, 0], "sum", seed=0)
    assert s.tasks_for(0) == ["a", "b"] and s.loss_scale("a") == 2
