import pytest
import torch

from fedmoe_pl.aggregation import classwise_mean, payload_bytes, weighted_mean


def test_weighted_mean_by_sample_count_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor(3.0)}
    out = weighted_mean([a, b], [1, 2])  # (1*a + 2*b) / 3
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(out["b"], torch.tensor(2.0))


def test_equal_weights_give_the_plain_mean_and_keep_dtype() -> None:
    a = {"w": torch.tensor([1.0, 3.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.float16)}
    out = weighted_mean([a, b], [10, 10])
    assert out["w"].dtype == torch.float16
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0], dtype=torch.float16))


def test_integer_counters_take_the_maximum_instead_of_a_truncated_mean() -> None:
    a = {"num_batches_tracked": torch.tensor(3)}
    b = {"num_batches_tracked": torch.tensor(10)}
    out = weighted_mean([a, b], [5, 1])
    assert out["num_batches_tracked"].dtype == torch.int64
    assert out["num_batches_tracked"].item() == 10


def test_single_upload_is_returned_as_is_but_not_aliased() -> None:
    a = {"w": torch.tensor([1.5, -2.0])}
    out = weighted_mean([a], [7])
    torch.testing.assert_close(out["w"], a["w"])
    assert out["w"].data_ptr() != a["w"].data_ptr()


@pytest.mark.parametrize(
    ("payloads", "weights", "match"),
    [
        ([], [], "at least one"),
        ([{"w": torch.zeros(1)}], [1, 2], "1 payloads but 2 weights"),
        ([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1], "payload 1 has keys"),
        ([{"w": torch.zeros(1)}], [0], "positive"),
    ],
)
def test_bad_inputs_are_refused(payloads: list, weights: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_mean(payloads, weights)


def test_payload_bytes_counts_raw_storage() -> None:
    assert payload_bytes({"a": torch.zeros(10), "b": torch.zeros(3, dtype=torch.float16)}) == 46


def test_classwise_mean_weighs_each_class_by_its_counts() -> None:
    # Client 1 saw class 0 once (mean 2) and class 1 three times (mean 4); client 2 saw class 0
    # three times (mean 6) and class 1 never.
    means = [torch.tensor([[2.0], [4.0]]), torch.tensor([[6.0], [0.0]])]
    counts = [torch.tensor([1, 3]), torch.tensor([3, 0])]
    mean, total = classwise_mean(means, counts)
    torch.testing.assert_close(mean, torch.tensor([[5.0], [4.0]]))
    assert total.tolist() == [4, 3]
