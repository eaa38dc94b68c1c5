"""The readers of the raw dataset formats: IDX and the CIFAR python version, and their errors naming the file."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from lrlightning.app.data.readers import read_cifar, read_idx



@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_plain_and_gzip(tmp_path, suffix, dataset_files):
    images = dataset_files.numbered_images(7)
    read = read_idx(dataset_files.idx(tmp_path / f"images{suffix}", images))
    assert read.dtype == torch.uint8
    assert torch.equal(read, images)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(read_idx(dataset_files.idx(tmp_path / f"labels{suffix}", labels)), labels)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda raw: raw[:-5], r"truncated, header declares shape \(3, 28, 28\) = 2352 bytes, found 2347"),
        (lambda raw: raw + b"xx", r"2 trailing bytes"),
        (lambda raw: b"\x01\x02" + raw[2:], r"not an IDX file \(magic number starts with 0102"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], r"element type 0x0d is not supported"),
        (lambda raw: raw[:9], r"truncated IDX header \(9 bytes, need 16 for 3 dims\)"),
        (lambda raw: gzip.compress(raw)[:-20], r"corrupted or truncated gzip stream"),
    ],
    ids=["short-payload", "trailing-bytes", "bad-magic", "float-type", "short-header", "truncated-gzip"],
)
def test_read_idx_names_the_file_and_the_problem(tmp_path, mangle, message, dataset_files):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(mangle(dataset_files.idx_bytes(dataset_files.numbered_images(3))))
    with pytest.raises(ValueError, match=rf"{path}: .*{message}"):
        read_idx(path)



@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "folder"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_cifar10_from_archive_or_folder(tmp_path, archive, protocol, dataset_files):
    target = tmp_path / "cifar-10-python.tar.gz" if archive else tmp_path
    source = dataset_files.cifar(target, "cifar10", archive, protocol)
    images, labels = read_cifar(source, train=True)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(20)]
    assert images[:, 0, 0, 0].tolist() == list(range(20))  # batches 1..5 in order
    expected = dataset_files.cifar_members("cifar10")["data_batch_2"]["data"][1].reshape(3, 32, 32)
    assert torch.equal(images[5], torch.from_numpy(expected))
    test_images, test_labels = read_cifar(source, train=False)
    assert test_images.shape == (4, 3, 32, 32) and test_images[:, 0, 0, 0].tolist() == [200, 201, 202, 203]


def test_read_cifar_accepts_the_parent_folder_of_the_extracted_batches(tmp_path, dataset_files):
    dataset_files.cifar(tmp_path, "cifar10", archive=False)
    assert read_cifar(tmp_path, train=False)[0].shape == (4, 3, 32, 32)


def test_read_cifar100_fine_and_coarse_labels(tmp_path, dataset_files):
    source = dataset_files.cifar(tmp_path / "cifar-100-python.tar.gz", "cifar100")
    _, fine = read_cifar(source, train=True)
    _, coarse = read_cifar(source, train=True, coarse=True)
    assert fine.tolist() == list(range(20)) and coarse.tolist() == list(range(20))
    _, fine_test = read_cifar(source, train=False)
    assert fine_test.tolist() == [0, 1, 2, 3]  # 200..203 mod 100
    with pytest.raises(ValueError, match="`coarse`=True needs CIFAR-100"):
        read_cifar(dataset_files.cifar(tmp_path / "c10.tar.gz", "cifar10"), train=True, coarse=True)


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_read_cifar_refuses_pickles_that_would_run_code(tmp_path, dataset_files):
    marker = tmp_path / "created-by-pickle"
    hostile = pickle.dumps({"data": _CreatesFile(marker), "labels": []})
    source = dataset_files.cifar(tmp_path / "c10.tar.gz", "cifar10", test_batch=hostile)
    with pytest.raises(ValueError, match=r"c10.tar.gz:test_batch: not a valid CIFAR batch \(global \w+\.open is not"):
        read_cifar(source, train=False)
    assert not marker.exists()


def test_read_cifar_reports_truncated_and_malformed_files(tmp_path, dataset_files):
    archive = dataset_files.cifar(tmp_path / "c10.tar.gz", "cifar10")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"{truncated}: corrupted or truncated archive"):
        read_cifar(truncated, train=True)

    cut_pickle = pickle.dumps(dataset_files.cifar_members("cifar10")["data_batch_3"], protocol=2)[:3000]
    source = dataset_files.cifar(tmp_path / "cut.tar.gz", "cifar10", data_batch_3=cut_pickle)
    with pytest.raises(ValueError, match=r"cut.tar.gz:data_batch_3: .*truncated"):
        read_cifar(source, train=True)

    wrong_shape = pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]})
    source = dataset_files.cifar(tmp_path / "shape.tar.gz", "cifar10", test_batch=wrong_shape)
    with pytest.raises(ValueError, match=r"shape.tar.gz:test_batch: 'data' must be uint8 of shape \(N, 3072\)"):
        read_cifar(source, train=False)

    bad_labels = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    source = dataset_files.cifar(tmp_path / "labels.tar.gz", "cifar10", test_batch=bad_labels)
    with pytest.raises(ValueError, match=r"labels.tar.gz:test_batch: labels outside \[0, 10\)"):
        read_cifar(source, train=False)

    with pytest.raises(ValueError, match=r"no CIFAR python batches found"):
        read_cifar(tmp_path, train=True)
