
import onnx
import pytest
from onnx import TensorProto, helper

from phiedge.artifacts import ModelFolder
from phiedge.checks.operators import check_graph, operator_sets, unsupported
from phiedge.errors import BuildError
from phiedge.schema import GraphChecks, OperatorSet

OPS = OperatorSet(provider="TestProvider", source="test", domains={
    "ai.onnx": {"Add": {"since": [14], "types": {"T": ["float"]}}, "If": {"since": [1]}},
    "com.microsoft": {"MatMulNBits": {"since": [1], "types": {"T1": ["float", "float16"]}}}})


def model(elem=TensorProto.FLOAT, op="Add", opset=21, branch_op=None):
    x = helper.make_tensor_value_info("x", elem, [2])
    y = helper.make_tensor_value_info("y", elem, [2])
    nodes = [helper.make_node(op, ["x", "x"], ["y"])]
    if branch_op:  # an If whose branch holds the node: subgraphs are checked too
        branch = helper.make_graph([helper.make_node(branch_op, ["x", "x"], ["z"])], "b", [],
                                   [helper.make_tensor_value_info("z", elem, [2])])
        c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
        graph = helper.make_graph(nodes, "g", [x, c], [y])
    else:
        graph = helper.make_graph(nodes, "g", [x], [y])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_supported_graph_passes():
    assert unsupported(model(), OPS) == []


def test_missing_operator_wrong_type_and_old_opset_are_named():
    assert unsupported(model(op="Sub"), OPS) == ["ai.onnx::Sub has no TestProvider kernel"]
    assert unsupported(model(elem=TensorProto.FLOAT16), OPS) == [
        "ai.onnx::Add on float16: TestProvider has it for float"]
    assert unsupported(model(opset=13), OPS) == [
        "ai.onnx::Add version 13 (opset 13) has no TestProvider kernel (registered at [14])"]


def test_operators_inside_subgraphs_are_checked():
    assert unsupported(model(branch_op="Mul"), OPS) == ["ai.onnx::Mul has no TestProvider kernel"]


def test_operator_lists_in_the_repo_are_valid_and_sourced():
    sets = operator_sets()
    assert {"cpu", "dml"} <= set(sets)
    for ops in sets.values():
        assert ops.source.startswith("https://")
        assert "MatMulNBits" in ops.domains["com.microsoft"]


def test_check_graph_names_provider_option_and_opset_problems(builds, tmp_path):
    built = builds("phi-4-mini", "int4")
    report = check_graph(ModelFolder(built), "cpu", GraphChecks(max_opset=21, operators="cpu", numeric=True))
    assert report["operators"]["com.microsoft::MatMulNBits"] > 0 and report["opset"] == 21
    with pytest.raises(BuildError, match="opset 21 is above 17"):
        check_graph(ModelFolder(built), "cpu", GraphChecks(max_opset=17, operators="cpu", numeric=True))
    with pytest.raises(BuildError, match="not 'dml'"):
        check_graph(ModelFolder(built), "dml", GraphChecks(max_opset=21, operators="cpu", numeric=True))
    with pytest.raises(BuildError, match="operator list 'nope' not found"):
        check_graph(ModelFolder(built), "cpu", GraphChecks(max_opset=21, operators="nope", numeric=True))
