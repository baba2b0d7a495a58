#!/usr/bin/env python3
"""Meta's Python Business SDK (facebook-business) on the same segment and the same Graph API
emulator as the fleet, for `ae-bench sdk` (issue 5). Prints one JSON line per field.

  hash:   CustomAudience.format_params over every value of the field, in batches of 10,000.
  upload: a new audience per field, then CustomAudience.add_users sequentially in batches of
          10,000, as a team using the SDK directly would.
"""
import argparse
import json
import time

from facebook_business.adobjects.adaccount import AdAccount
from facebook_business.adobjects.customaudience import CustomAudience
from facebook_business.api import FacebookAdsApi
from facebook_business.session import FacebookSession

FIELDS = {
    "email": (CustomAudience.Schema.email_hash, ("email",)),
    "phone": (CustomAudience.Schema.phone_hash, ("phone",)),
    "madid": (CustomAudience.Schema.mobile_advertiser_id, ("madid", "idfa")),
}
BATCH = 10_000


def load(path):
    """Every present, non-blank value per field, read the way the fleet reads the segment."""
    columns = {field: [] for field in FIELDS}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                member = json.loads(line)
            except ValueError:
                continue
            for field, (_, keys) in FIELDS.items():
                for key in keys:
                    value = member.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        value = str(value)
                    if isinstance(value, str) and value.strip():
                        columns[field].append(value)
                        break
    return columns


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["hash", "upload"])
    parser.add_argument("--graph", required=True, help="base URL of the Graph API emulator")
    parser.add_argument("--token", required=True)
    parser.add_argument("--account", required=True, help="ad account number, without act_")
    parser.add_argument("--segment", required=True)
    parser.add_argument("--api-version", default="v26.0")
    args = parser.parse_args()

    columns = load(args.segment)
    FacebookSession.GRAPH = args.graph
    FacebookAdsApi.init(access_token=args.token, api_version=args.api_version, crash_log=False)

    for field, (schema, _) in FIELDS.items():
        users = columns[field]
        started = time.perf_counter()
        calls = 0
        if args.mode == "hash":
            for i in range(0, len(users), BATCH):
                CustomAudience.format_params(schema, users[i:i + BATCH])
        else:
            audience = AdAccount("act_" + args.account).create_custom_audience(params={
                "name": "SDK bench - " + field,
                "subtype": "CUSTOM",
                "customer_file_source": "USER_PROVIDED_ONLY",
            })
            calls += 1
            target = CustomAudience(audience["id"])
            for i in range(0, len(users), BATCH):
                target.add_users(schema, users[i:i + BATCH])
                calls += 1
        seconds = time.perf_counter() - started
        print(json.dumps({"mode": args.mode, "field": field, "records": len(users),
                          "calls": calls, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
