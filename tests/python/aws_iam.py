"""Makes an IAM user with an access key in moto (the stand-in the tests start) and prints
the key: "ACCESS_KEY_ID SECRET_ACCESS_KEY". STS then answers GetCallerIdentity requests
signed with it with the user's ARN.

usage: aws_iam.py ENDPOINT USER_NAME
"""
import sys

import boto3


def main():
    endpoint, name = sys.argv[1:3]
    iam = boto3.client(
        "iam",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    print(key["AccessKeyId"], key["SecretAccessKey"])


main()
