"""Ask a dnr-tf model served by TF Serving over gRPC (`serving_default`, serialized tf.Examples).

    python docs/serving/grpc_client.py --server localhost:8500 --model ml100k_dnr_b \
        --records 'data/ml100k/test-*.tfrecord.gz' --n 2

Needs only tensorflow, grpcio and tensorflow-serving-api (`pip install --no-deps
tensorflow-serving-api`), not dnr-tf.
"""

from __future__ import annotations

import argparse
import glob

import tensorflow as tf
from tensorflow_serving.apis import predict_pb2


def build_request(examples: list[bytes], model_name: str, signature: str = "serving_default"):
    """A PredictRequest for `examples`, serialized tf.Examples in the pipeline's record format."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
    return request


def main() -> None:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="localhost:8500")
    parser.add_argument("--model", required=True)
    parser.add_argument("--records", required=True, help="glob of gzip TFRecords written by the pipeline")
    parser.add_argument("--n", type=int, default=2)
    args = parser.parse_args()
    files = sorted(glob.glob(args.records))
    examples = [bytes(x.numpy()) for x in tf.data.TFRecordDataset(files, compression_type="GZIP").take(args.n)]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(args.server))
    response = stub.Predict(build_request(examples, args.model), timeout=5.0)
    print("top_k_item_ids:", tf.make_ndarray(response.outputs["top_k_item_ids"]))
    print("scores:", tf.make_ndarray(response.outputs["scores"]))


if __name__ == "__main__":
    main()
