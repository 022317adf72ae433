"""The README's curl session, replayed through a client generated from /openapi.json.

Run by tests/api/openapi.rs after `openapi-python-client generate` has written the
package `chatshard_client` into a directory on PYTHONPATH. Every request goes
through the generated client (its operations and models), never raw HTTP, so a
document that a client generator reads wrongly shows up here.

    python readme_session.py --base-url http://127.0.0.1:PORT \
        --chat-id CHAT --missing-chat-id OTHER [--token TOKEN]

With --token (an instance with [[api.clients]]), every request goes through
the generated AuthenticatedClient, which sends `Authorization: Bearer TOKEN`.

Exits 0 when every answer is as the README says; otherwise prints each mismatch
and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import traceback
from collections.abc import Callable
from typing import Any


class Session:
    """Collects mismatches so that one run reports all of them."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, step: str, what: str, actual: Any, expected: Any) -> bool:
        if actual != expected:
            self.failures.append(f"{step}: {what} is {actual!r}, expected {expected!r}")
            return False
        return True

    def require(self, step: str, what: str, ok: bool, detail: Any = None) -> bool:
        if not ok:
            suffix = f" ({detail!r})" if detail is not None else ""
            self.failures.append(f"{step}: {what}{suffix}")
        return ok

    def call(self, step: str, fn: Callable[[], Any]) -> Any:
        """Runs one request; an exception (transport, parsing, serializing) is a mismatch."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, none hidden
            tb = traceback.format_exc(limit=4)
            self.failures.append(
                f"{step}: the generated client raised {type(e).__name__}: {e}\n{tb}"
            )
            return None

    def answer(self, step: str, response: Any, status: int, model: type) -> Any:
        """Checks the status and that the generated client parsed the body as `model`."""
        if response is None:
            return None
        body = response.content.decode("utf-8", "replace")
        if not self.check(
            step, f"status (body {body})", int(response.status_code), status
        ):
            return None
        parsed = response.parsed
        if not self.require(
            step,
            f"the generated client did not parse the answer as {model.__name__}",
            isinstance(parsed, model),
            f"parsed={parsed!r}, body={body}",
        ):
            return None
        return parsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument(
        "--chat-id", required=True, help="a chat id that does not exist yet"
    )
    parser.add_argument(
        "--missing-chat-id", required=True, help="a chat id that is never created"
    )
    parser.add_argument(
        "--token", help="a client's bearer token, for an instance with [[api.clients]]"
    )
    args = parser.parse_args()

    try:
        from chatshard_client import AuthenticatedClient, Client, models
        from chatshard_client.api.chats import put_chat
        from chatshard_client.api.events import create_stream, get_events
        from chatshard_client.api.members import get_member_count, join
        from chatshard_client.api.messages import post_message
    except ImportError as e:
        print(
            f"the generated client lacks a module or name the README session needs: {e}",
            file=sys.stderr,
        )
        return 1

    problem_model = getattr(models, "Problem", None)
    s = Session()
    chat = args.chat_id
    # An undocumented status raises instead of parsing to None: the document must
    # list every status the session sees.
    if args.token is None:
        client = Client(
            base_url=args.base_url, raise_on_unexpected_status=True, timeout=30.0
        )
    else:
        client = AuthenticatedClient(
            base_url=args.base_url,
            token=args.token,
            raise_on_unexpected_status=True,
            timeout=30.0,
        )

    with client:
        # 1. PUT /v1/chats/{chatId} {"maxMembers": 5000} -> 201
        step = "PUT /v1/chats/{chatId} with {maxMembers: 5000}"
        r = s.call(
            step,
            lambda: put_chat.sync_detailed(
                chat, client=client, body=models.CreateChatRequest(max_members=5000)
            ),
        )
        created = s.answer(step, r, 201, models.Chat)
        if created is not None:
            s.check(step, "chatId", created.chat_id, chat)
            s.require(
                step,
                "shard is not a non-empty string",
                isinstance(created.shard, str) and created.shard != "",
                created.shard,
            )
            s.check(step, "memberCount", created.member_count, 0)
            s.check(step, "maxMembers", created.max_members, 5000)
            s.check(step, "revision", created.revision, 0)
            s.require(
                step,
                "createdAt was not parsed as a datetime",
                isinstance(created.created_at, datetime.datetime),
                created.created_at,
            )

        # 1b. The body is optional: PUT again with none -> 200, the chat as it is.
        step = "PUT /v1/chats/{chatId} with no body"
        r = s.call(step, lambda: put_chat.sync_detailed(chat, client=client))
        if (
            r is not None
            and int(r.status_code) == 400
            and b"malformed_json" in r.content
        ):
            s.failures.append(
                f"{step}: the generated client sends Content-Type: application/json with an empty "
                "body when no body is given, and the server answers malformed_json to that; an "
                "optional body is usable from this client only if an empty body counts as no body"
            )
        existing = s.answer(step, r, 200, models.Chat)
        if existing is not None:
            s.check(step, "chatId", existing.chat_id, chat)
            s.check(
                step,
                "maxMembers (kept when no body is sent)",
                existing.max_members,
                5000,
            )
            s.check(step, "memberCount", existing.member_count, 0)
            s.check(step, "revision", existing.revision, 0)
            if created is not None:
                s.check(step, "shard", existing.shard, created.shard)

        # 2. POST /v1/chats/{chatId}/members {"userId": "alice"} -> 201
        step = "POST /v1/chats/{chatId}/members"
        r = s.call(
            step,
            lambda: join.sync_detailed(
                chat, client=client, body=models.JoinRequest(user_id="alice")
            ),
        )
        member = s.answer(step, r, 201, models.Member)
        if member is not None:
            s.check(step, "chatId", member.chat_id, chat)
            s.check(step, "userId", member.user_id, "alice")
            s.check(step, "state", member.state, models.MemberState.JOINED)
            s.require(
                step,
                "memberId is not an integer",
                isinstance(member.member_id, int),
                member.member_id,
            )
            s.require(
                step,
                "joinedAt was not parsed as a datetime",
                isinstance(member.joined_at, datetime.datetime),
                member.joined_at,
            )

        # 3. POST /v1/chats/{chatId}/messages -> 201, revision 2
        step = "POST /v1/chats/{chatId}/messages"
        r = s.call(
            step,
            lambda: post_message.sync_detailed(
                chat,
                client=client,
                body=models.PostMessageRequest(
                    sender_id="alice", client_message_id="m-1", text="hello"
                ),
            ),
        )
        message = s.answer(step, r, 201, models.Message)
        if message is not None:
            s.check(step, "chatId", message.chat_id, chat)
            s.check(step, "revision", message.revision, 2)
            s.check(step, "senderId", message.sender_id, "alice")
            s.check(step, "clientMessageId", message.client_message_id, "m-1")
            s.check(step, "text", message.text, "hello")
            s.require(
                step,
                "messageId is not an integer",
                isinstance(message.message_id, int),
                message.message_id,
            )

        # 4. GET /v1/chats/{chatId}/events?after=0&limit=100 -> 2 events
        step = "GET /v1/chats/{chatId}/events?after=0&limit=100"
        r = s.call(
            step,
            lambda: get_events.sync_detailed(chat, client=client, after=0, limit=100),
        )
        page = s.answer(step, r, 200, models.EventPage)
        if page is not None:
            s.check(step, "latestRevision", page.latest_revision, 2)
            got = [(e.revision, e.type_, e.user_id) for e in page.events]
            expected = [
                (1, models.EventType.MEMBER_JOINED, "alice"),
                (2, models.EventType.MESSAGE_SENT, "alice"),
            ]
            if s.check(step, "(revision, type, userId) of the events", got, expected):
                sent_event = page.events[1]
                s.check(step, "text of MESSAGE_SENT", sent_event.text, "hello")
                if message is not None:
                    s.check(
                        step,
                        "messageId of MESSAGE_SENT",
                        sent_event.message_id,
                        message.message_id,
                    )

        # 5. GET /v1/chats/{chatId}/member-count -> 1
        step = "GET /v1/chats/{chatId}/member-count"
        r = s.call(step, lambda: get_member_count.sync_detailed(chat, client=client))
        count = s.answer(step, r, 200, models.MemberCount)
        if count is not None:
            s.check(step, "chatId", count.chat_id, chat)
            s.check(step, "memberCount", count.member_count, 1)

        # 6. An error: joining a chat that does not exist -> 404 chat_not_found
        step = "POST /v1/chats/{missing}/members"
        missing = args.missing_chat_id
        r = s.call(
            step,
            lambda: join.sync_detailed(
                missing, client=client, body=models.JoinRequest(user_id="alice")
            ),
        )
        if r is not None:
            content_type = r.headers.get("content-type", "")
            s.check(step, "content type", content_type, "application/problem+json")
            if s.require(
                step,
                "the generated client has no error model named Problem",
                problem_model is not None,
            ):
                problem = s.answer(step, r, 404, problem_model)
                if problem is not None:
                    s.check(step, "code", problem.code, "chat_not_found")
                    s.check(step, "status", problem.status, 404)
                    s.check(
                        step,
                        "type",
                        problem.type_,
                        "urn:chatshard:problem:chat_not_found",
                    )
                    s.require(
                        step,
                        "title/detail are not strings",
                        isinstance(problem.title, str)
                        and isinstance(problem.detail, str),
                    )
            else:
                s.check(step, "status", int(r.status_code), 404)

        # 7. POST /v1/streams {"chats": {chat: 0}} -> 201, a stream following it
        step = "POST /v1/streams"
        r = s.call(
            step,
            lambda: create_stream.sync_detailed(
                client=client,
                body=models.CreateStreamRequest.from_dict({"chats": {chat: 0}}),
            ),
        )
        view = s.answer(step, r, 201, models.StreamView)
        if view is not None:
            s.require(
                step,
                "streamId is not 32 hexadecimal characters",
                isinstance(view.stream_id, str)
                and len(view.stream_id) == 32
                and all(c in "0123456789abcdef" for c in view.stream_id),
                view.stream_id,
            )
            s.check(step, "lastEventId", view.last_event_id, 0)
            s.check(step, "chats", view.to_dict().get("chats"), {chat: 0})

    if s.failures:
        print(
            f"{len(s.failures)} mismatch(es) between the README session and the generated client:",
            file=sys.stderr,
        )
        for failure in s.failures:
            print(f"- {failure}", file=sys.stderr)
        return 1
    print(
        f"README session through the generated client: every answer as documented (chat {chat})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
