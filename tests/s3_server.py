"""The object-storage tests' S3 server: moto's server on a loopback port of its choosing, filled as
a survey team would fill a bucket. Run with the moto venv's python (`make setup-tests` makes it).

Three unauthenticated IAM calls make a user with a key that may do anything; after them the
server checks every request's signature, so wrong credentials are refused as AWS refuses them.
The plan's objects are put through the S3 API with boto3; its generated objects (thousands of
tiny ones, for listings) straight into moto's backend, which takes seconds where the API takes
minutes. They are listed and read only through the S3 API.

Reads a JSON plan on stdin:
  {"objects": {"BUCKET": {"KEY": {"file": PATH} | {"text": STR} | {"zeros": N}}},
   "generated": [{"bucket": B, "prefix": P, "count": N, "files": [PATH, ...]}]}
(N objects P00000.jpg, ...: the files' bytes in turn, or a few bytes that are not a photo)
prints one line, {"endpoint": ..., "access_key_id": ..., "secret_access_key": ...}, once every
object is in place, and serves until stdin closes (the test that started it ended).
"""

import json
import logging
import sys

from moto import settings

settings.INITIAL_NO_AUTH_ACTION_COUNT = 3

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402
from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: E402
from moto.moto_server.werkzeug_app import MotoRequestHandler  # noqa: E402
from moto.s3.models import s3_backends  # noqa: E402


def main():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # werkzeug writes a response's headers and body apart: with Nagle's algorithm on, the body
    # waits for the client's delayed ACK of the headers (up to 40 ms a request), which no S3
    # store does.
    MotoRequestHandler.disable_nagle_algorithm = True
    plan = json.loads(sys.stdin.readline())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    config = Config(retries={"max_attempts": 3})
    # Exactly three calls before the server checks signatures: none may be retried.
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup", config=Config(retries={"max_attempts": 1}))
    iam.create_user(UserName="survey")
    iam.put_user_policy(UserName="survey", PolicyName="everything", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="survey")["AccessKey"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                      aws_secret_access_key=key["SecretAccessKey"], config=config)

    for bucket, objects in plan.get("objects", {}).items():
        s3.create_bucket(Bucket=bucket)
        for name, content in objects.items():
            if "file" in content:
                with open(content["file"], "rb") as f:
                    body = f.read()
            elif "text" in content:
                body = content["text"].encode()
            else:
                body = bytes(content["zeros"])
            s3.put_object(Bucket=bucket, Key=name, Body=body)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    made = set(plan.get("objects", {}))
    for generated in plan.get("generated", []):
        if generated["bucket"] not in made:
            s3.create_bucket(Bucket=generated["bucket"])
            made.add(generated["bucket"])
        bodies = []
        for path in generated.get("files", []):
            with open(path, "rb") as f:
                bodies.append(f.read())
        bodies = bodies or [b"not really a photo"]
        for i in range(generated["count"]):
            body = bodies[i % len(bodies)]
            backend.put_object(generated["bucket"], f"{generated['prefix']}{i:05}.jpg", body)
    print(json.dumps({"endpoint": endpoint, "access_key_id": key["AccessKeyId"],
                      "secret_access_key": key["SecretAccessKey"]}), flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
