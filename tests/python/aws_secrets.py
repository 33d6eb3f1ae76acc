"""Drives moto's Secrets Manager (the stand-in the tests start) with boto3.

usage: aws_secrets.py ENDPOINT create NAME TEXT
       aws_secrets.py ENDPOINT put NAME TEXT [pending]   new version: AWSCURRENT, or AWSPENDING
       aws_secrets.py ENDPOINT promote NAME              AWSCURRENT moves to the AWSPENDING version
"""
import sys

import boto3


def main():
    endpoint, action, name = sys.argv[1:4]
    c = boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    if action == "create":
        c.create_secret(Name=name, SecretString=sys.argv[4])
    elif action == "put":
        if sys.argv[5:] == ["pending"]:
            c.put_secret_value(SecretId=name, SecretString=sys.argv[4], VersionStages=["AWSPENDING"])
        else:
            # Secrets Manager's default: AWSCURRENT moves here, AWSPREVIOUS to the old one.
            c.put_secret_value(SecretId=name, SecretString=sys.argv[4])
    elif action == "promote":
        versions = c.describe_secret(SecretId=name)["VersionIdsToStages"]
        current = next(v for v, s in versions.items() if "AWSCURRENT" in s)
        pending = next(v for v, s in versions.items() if "AWSPENDING" in s)
        c.update_secret_version_stage(
            SecretId=name,
            VersionStage="AWSCURRENT",
            MoveToVersionId=pending,
            RemoveFromVersionId=current,
        )
        # As a rotation's end leaves it: AWSPENDING on no version.
        c.update_secret_version_stage(
            SecretId=name, VersionStage="AWSPENDING", RemoveFromVersionId=pending
        )
    else:
        raise SystemExit(f"unknown action {action}")
    print("ok")


main()
