"""Drives moto (the stand-in for AWS the tests start) with boto3.

usage: aws.py ENDPOINT create NAME TEXT            a secret
       aws.py ENDPOINT put NAME TEXT [pending]     new version: AWSCURRENT, or AWSPENDING
       aws.py ENDPOINT promote NAME                AWSCURRENT moves to the AWSPENDING version
       aws.py ENDPOINT iam-user NAME               an IAM user with an access key; prints
                                                   "ACCESS_KEY_ID SECRET_ACCESS_KEY" (STS then
                                                   answers requests signed with it with the
                                                   user's ARN)
"""
import sys

import boto3


def main():
    endpoint, action, name = sys.argv[1:4]
    client = lambda service: boto3.client(
        service,
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    if action == "iam-user":
        iam = client("iam")
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        print(key["AccessKeyId"], key["SecretAccessKey"])
        return
    c = client("secretsmanager")
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
