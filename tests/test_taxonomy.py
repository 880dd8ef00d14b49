import numpy as np
import pandas as pd
import pytest

from wingspan.data.taxonomy import Taxonomy, taxonomy_conflicts
from wingspan.errors import WingspanError

ROWS = [  # family, genus, species
    ("Nymphalidae", "Vanessa", "Vanessa atalanta"),
    ("Nymphalidae", "Vanessa", "Vanessa cardui"),
    ("Nymphalidae", "Danaus", "Danaus plexippus"),
    ("Pieridae", "Pieris", "Pieris rapae"),
]
LEVELS = ["family", "genus", "species"]


@pytest.fixture
def tax():
    table = pd.DataFrame(ROWS, columns=LEVELS).assign(path=[f"{i}.jpg" for i in range(4)])
    return Taxonomy.from_table(table, LEVELS)


def test_marginalisation_sums_descendants(tax):
    # species order: Danaus plexippus, Pieris rapae, Vanessa atalanta, Vanessa cardui
    probs = np.array([[0.1, 0.4, 0.3, 0.2]])
    m = tax.marginals(probs)
    assert tax.classes["family"] == ["Nymphalidae", "Pieridae"]
    np.testing.assert_allclose(m["family"], [[0.6, 0.4]])
    np.testing.assert_allclose(m["genus"], [[0.1, 0.4, 0.5]])  # Danaus, Pieris, Vanessa
    np.testing.assert_allclose(m["species"], probs)


def test_top_down_prediction_is_consistent_and_uses_the_marginals(tax):
    # The likeliest single species is Pieris rapae (0.4), but the family is Nymphalidae
    # (0.6) and within it genus Vanessa (0.5), then Vanessa atalanta.
    pred = tax.predict(np.array([[0.1, 0.4, 0.3, 0.2]]), temperature=1.0)
    names = {lv: tax.classes[lv][pred[lv][0]] for lv in LEVELS}
    assert names == {"family": "Nymphalidae", "genus": "Vanessa", "species": "Vanessa atalanta"}
    rng = np.random.default_rng(0)
    many = rng.dirichlet(np.ones(4) * 0.3, size=500)
    assert tax.consistent(tax.predict(many, temperature=1.0)).all()  # 100% by construction


def test_no_temperature_changes_the_branch():
    """The branch is chosen on the probabilities at temperature 1, whatever temperature
    they are given at: calibrating changes the probabilities shown, never the answer. On
    sums of calibrated probabilities it moved (genus A's three species gain on b1 as T
    rises), and a temperature fitted on shifted photos changed 13 of 23 answers."""
    from wingspan.evaluate.calibration import softmax
    from wingspan.predict import taxonomy_path

    tree = Taxonomy(["genus", "species"], {"genus": ["A", "B"],
                                           "species": ["a1", "a2", "a3", "b1"]},
                    {"genus": [0, 0, 0, 1], "species": [0, 1, 2, 3]})
    logits = np.random.default_rng(2).normal(0, 1, (400, 4)) + np.array([0, 0, 0, 1.2])
    at_1 = tree.predict(softmax(logits), temperature=1.0)
    moved = 0
    for t in (0.25, 0.6, 1.7, 4.0, 10.0):
        calibrated = softmax(logits, t).astype(np.float32)  # as predict holds them
        for lv, chosen in tree.predict(calibrated, temperature=t).items():
            np.testing.assert_array_equal(chosen, at_1[lv])
        moved += (tree.predict(calibrated, temperature=1.0)["species"] != at_1["species"]).sum()
        branch = taxonomy_path(tree, calibrated[7], t)  # its probabilities: the calibrated
        assert [c for _, c, _ in branch] == [tree.classes[lv][at_1[lv][7]] for lv in tree.levels]
        assert branch[0][2] == pytest.approx(calibrated[7][tree.parents["genus"] == at_1[
            "genus"][7]].sum(), rel=1e-6)
    assert moved > 20  # (what taking the branch on the calibrated sums would have changed)


def test_no_temperature_changes_an_answer_under_tta_either():
    """With --tta the views' probabilities at T 1 are averaged and the mean calibrated
    (`view_probabilities`): the answer stays where T 1 puts it, flat and top-down alike.
    Averaging calibrated views moved both (15 of 160 taxonomy answers at T 0.25)."""
    import torch

    from wingspan.evaluate.calibration import softmax
    from wingspan.inference import view_probabilities

    tree = Taxonomy(["genus", "species"], {"genus": ["A", "B"],
                                           "species": ["a1", "a2", "a3", "b1"]},
                    {"genus": [0, 0, 0, 1], "species": [0, 1, 2, 3]})
    rng = np.random.default_rng(3)
    views = torch.from_numpy(rng.normal(0, 2, (500, 4, 4)) + np.array([0, 0, 0, 1.2]))
    one = views[:, :1]  # one view: softmax(z / T), as without TTA
    np.testing.assert_allclose(view_probabilities(one, 2.5).numpy(),
                               softmax(one[:, 0].numpy(), 2.5), rtol=1e-5, atol=1e-7)
    at_1 = view_probabilities(views, 1.0).numpy()
    np.testing.assert_allclose(at_1, softmax(views.numpy().reshape(-1, 4)).reshape(
        500, 4, 4).mean(1), rtol=1e-5, atol=1e-7)  # the views' plain mean at T 1
    moved = {"flat": 0, "branch": 0}
    for t in (0.25, 0.6, 4.0, 10.0):
        calibrated = view_probabilities(views, t).numpy()
        np.testing.assert_array_equal(calibrated.argmax(1), at_1.argmax(1))
        np.testing.assert_array_equal(tree.answer(calibrated, temperature=t),
                                      tree.answer(at_1, temperature=1.0))
        averaged = softmax(views.numpy().reshape(-1, 4), t).reshape(500, 4, 4).mean(1)
        moved["flat"] += (averaged.argmax(1) != at_1.argmax(1)).sum()
        moved["branch"] += (tree.answer(averaged, temperature=t)
                            != tree.answer(at_1, temperature=1.0)).sum()
    assert moved["flat"] > 0 and moved["branch"] > 0  # (what averaging calibrated views did)


def test_consistency_of_independent_predictions(tax):
    preds = {"family": np.array([0, 0, 1]), "genus": np.array([2, 1, 1]),
             "species": np.array([2, 1, 1])}
    # 1st: Nymphalidae > Vanessa > Vanessa atalanta (fine); 2nd: Nymphalidae > Pieris (not);
    # 3rd: Pieridae > Pieris > Pieris rapae (fine)
    assert tax.consistent(preds).tolist() == [True, False, True]


def test_mistake_depth_on_hand_made_cases(tax):
    truth = {"family": np.array([0, 0, 0, 0]), "genus": np.array([2, 2, 2, 2]),
             "species": np.array([2, 2, 2, 2])}  # all Vanessa atalanta
    preds = {"family": np.array([0, 0, 0, 1]), "genus": np.array([2, 2, 0, 1]),
             "species": np.array([2, 3, 0, 1])}
    # right; same genus (cardui); same family (Danaus); other family (Pieris)
    assert tax.mistake_depth(preds, truth).tolist() == [0, 1, 2, 3]


def test_contradictory_taxonomy_is_refused_naming_rows():
    table = pd.DataFrame(ROWS + [("Pieridae", "Vanessa", "Vanessa virginiensis")],
                         columns=LEVELS).assign(path=[f"img{i}.jpg" for i in range(5)])
    with pytest.raises(WingspanError, match="(?s)genus 'Vanessa' is under 2 family values.*"
                                            "'Pieridae' \\(e.g. img4.jpg\\)"):
        Taxonomy.from_table(table, LEVELS)


def test_round_trip(tax):
    again = Taxonomy.from_dict(tax.to_dict())
    probs = np.random.default_rng(1).dirichlet(np.ones(4), size=10)
    for lv in LEVELS:
        np.testing.assert_array_equal(again.predict(probs, temperature=1.0)[lv],
                                      tax.predict(probs, temperature=1.0)[lv])


def test_level_columns_are_ordered_coarse_to_fine():
    from wingspan.data.taxonomy import coarse_to_fine

    table = pd.DataFrame({
        "genus": ["Danaus", "Vanessa", "Vanessa", "Pieris", "Lycaena"],
        "family": ["Nymphalidae", "Nymphalidae", "Nymphalidae", "Pieridae", "Lycaenidae"],
        "subfamily": ["Danainae", "Nymphalinae", "Nymphalinae", "", ""]})
    # Subfamily is given for one family only: it has fewer classes overall than family,
    # yet it is the finer of the two where both are given.
    assert coarse_to_fine(table, ["genus", "family", "subfamily"]) == [
        "family", "subfamily", "genus"]
    # A genus under two families (a slip) leaves genus fewer classes than family: ranks keep
    # their order, so the conflict is found, rather than a tree read with genus on top.
    slip = pd.DataFrame({"family": ["Lycaenidae", "Nymphalidae", "Papilionidae", "Pieridae"],
                         "genus": ["Pixelia", "Pixelia", "Fictilia", "Chalkia"],
                         "clade": ["x", "x", "y", "y"]})
    assert coarse_to_fine(slip, ["genus", "family", "clade"]) == ["clade", "family", "genus"]
    assert taxonomy_conflicts(slip.assign(label=list("abcd")), ["family", "genus", "label"])


def test_one_image_at_a_time_answers_as_a_batch_on_a_large_tree():
    """predict's per-image branch (taxonomy_path, with the tree's membership made once, not
    per image) gives what the batch does, and each marginal is its descendants' sum."""
    from wingspan.predict import taxonomy_path

    rng = np.random.default_rng(0)
    species = [f"s{i:03d}" for i in range(300)]  # sorted as the model orders them
    table = pd.DataFrame({"species": species, "genus": [f"g{i // 4:02d}" for i in range(300)],
                          "family": [f"f{i // 60}" for i in range(300)], "path": species})
    tree = Taxonomy.from_dict(Taxonomy.from_table(table, ["family", "genus", "species"])
                              .to_dict())
    probs = rng.dirichlet(np.ones(300) * 0.1, 50)
    marginals, chosen = tree.marginals(probs), tree.predict(probs, temperature=1.0)
    by_family = pd.DataFrame(probs.T).groupby(table["family"].to_numpy()).sum().T.to_numpy()
    np.testing.assert_allclose(marginals["family"], by_family)
    for i in range(len(probs)):
        branch = taxonomy_path(tree, probs[i], 1.0)
        assert [(lv, c) for lv, c, _ in branch] == [
            (lv, tree.classes[lv][chosen[lv][i]]) for lv in tree.levels]
        assert [p for _, _, p in branch] == pytest.approx(
            [marginals[lv][i, chosen[lv][i]] for lv in tree.levels])


def test_a_tree_of_10000_species_is_held_sparse_and_answers_fast():
    """Dense membership matrices, with the finest level's identity, took 1.28 GB and 73 ms
    an image at 10,000 species (a 10k-image evaluate: 12 min of summing)."""
    import time

    from wingspan.predict import taxonomy_path

    rng = np.random.default_rng(0)
    genus = rng.integers(0, 1000, 10_000)
    tree = Taxonomy(["family", "genus", "species"],
                    {"family": [f"f{i}" for i in range(100)],
                     "genus": [f"g{i}" for i in range(1000)],
                     "species": [f"s{i}" for i in range(10_000)]},
                    {"family": rng.integers(0, 100, 1000)[genus], "genus": genus,
                     "species": np.arange(10_000)})
    assert sum(m.data.nbytes + m.indices.nbytes for m in tree.sums.values()) < 1e6
    assert tree.finest not in tree.sums  # (no identity)
    probs = rng.dirichlet(np.ones(10_000), 20).astype(np.float32)
    start = time.perf_counter()
    branches = [taxonomy_path(tree, p, 1.0) for p in probs]
    assert (time.perf_counter() - start) / len(probs) < 0.02  # (0.2 ms here; 73 ms dense)
    marginals = tree.marginals(probs)
    assert marginals["genus"].shape == (20, 1000) and marginals["genus"].dtype == np.float64
    np.testing.assert_allclose(marginals["genus"].sum(1), 1, rtol=1e-5)
    chosen = tree.predict(probs, temperature=1.0)
    assert [[c for _, c, _ in b] for b in branches] == [
        [tree.classes[lv][chosen[lv][i]] for lv in tree.levels] for i in range(len(probs))]
    # the dense 0/1 matrices the unknown scores and the exported graph take
    member = tree.member["genus"]
    assert member.shape == (10_000, 1000) and (member.sum(1) == 1).all()


def test_a_level_left_blank_in_the_data_is_read_from_the_tree_for_the_mistake_depth():
    """A wrong genus left blank in the data counted as "right genus, wrong species" (depth
    1); the rare species' accuracy at a level scored a blank there as a mistake."""
    from wingspan.evaluate.hierarchy import hierarchical_metrics, truth_indices

    levels = ["family", "genus", "species"]
    table = pd.DataFrame({"family": ["F1", "F1", "F2"], "genus": ["G1", "G2", "G3"],
                          "species": ["a", "b", "c"], "path": ["x", "y", "z"]})
    tree = Taxonomy.from_table(table, levels)
    rows = pd.DataFrame({"family": ["F1", "F1", ""], "genus": ["", "G2", "G2"],
                         "species": ["b", "b", "b"]})
    truth = truth_indices(tree, rows, {})
    probs = np.array([[0.6, 0.3, 0.1]] * 3)  # F1 > G1 > a: right family, wrong genus
    result = hierarchical_metrics(tree, truth, probs, None, np.ones(3, bool), temperature=1.0)
    assert result["mistake_depth"] == {"2": 3}
    assert result["levels"]["genus"]["no_truth"] == 1  # (the level's own figures: left out)
    assert result["rare"]["accuracy"] == {"family": 1.0, "genus": 0.0, "species": 0.0}


def test_mistake_depth_ignores_a_level_with_no_truth():
    from wingspan.data.taxonomy import Taxonomy

    tax = Taxonomy(["family", "label"], {"family": ["F"], "label": ["a", "b"]},
                   {"family": [0, 0], "label": [0, 1]})
    preds = {"family": np.array([0, 0]), "label": np.array([0, 1])}
    truth = {"family": np.array([-1, -1]), "label": np.array([0, 0])}
    assert tax.mistake_depth(preds, truth).tolist() == [0, 1]


def test_a_level_filled_in_for_few_rows_is_still_ordered_by_the_full_rows():
    """'clade' has 3 classes overall, 'lineage' 2 (given for two rows only): among the rows
    that give both, lineage splits what clade holds together, so it is the finer."""
    from wingspan.data.taxonomy import coarse_to_fine

    table = pd.DataFrame({"lineage": ["x", "y", "", "", "", ""],
                          "clade": ["A", "A", "B", "B", "C", "C"]})
    assert coarse_to_fine(table, ["lineage", "clade"]) == ["clade", "lineage"]
