"""Users read the bot in their own Discord language (the server's for public notices), end to end through the
fake Discord: refusals, progress, results, failures, buttons and reply-refines."""

from __future__ import annotations

import pytest
from botharness import basic_world, bot_running, button, command, edit, finished, make_config, private_answer
from fakediscord import permissions as perms
from faults import inject_faults

from bot import i18n

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return basic_world(fake_endpoints)


def labels(message) -> set[str]:
    return {c.get("label") for row in message.components for c in row.get("components", [])}


def fields_of(message) -> dict[str, str]:
    return {f["name"]: f["value"] for f in message.embeds[0]["fields"]}


def private_texts(inter) -> list[str]:
    return [m.content for m in inter.messages if m.ephemeral and not m.deleted]


async def test_a_german_users_refusals_are_in_german(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    alice.locale = "de"
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        await bot.store.update_guild_settings(guild.id, max_steps=5)
        text = await private_answer(fake, await edit(fake, alice, channel, steps=10))
        assert text == "Dieser Server erlaubt höchstens 5 Schritte."

        # An engine error (the upload is no image) reaches her in German too, privately after the defer.
        bad = await edit(fake, alice, channel, data=b"this is not a picture at all")
        await fake.wait_for(lambda: private_texts(bad), timeout=30)
        assert private_texts(bad) == [i18n.text("engine.image_not_an_image", "de")]
        assert private_texts(bad)[0].startswith("Diese Datei ist kein Bild")

        await bot.store.block_user(guild.id, alice.id, reason="", blocked_by=1)
        assert await private_answer(fake, await edit(fake, alice, channel)) == \
            "Du kannst MGIE auf diesem Server nicht verwenden."


async def test_a_japanese_users_progress_result_and_buttons_are_in_japanese(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    alice.locale = "ja"  # the server stays English: what is addressed to her follows her locale
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        msg = await finished(fake, await edit(fake, alice, channel, seed=7))
        said = [h.get("content") or "" for h in msg.history]
        assert any(s.startswith("⏳ 待機中") or s.startswith("⏳ モデルを準備中") for s in said), said
        assert any(s.startswith("🧠 画像を読み取り") or s.startswith("🎨 描画中") for s in said), said
        assert msg.content == "✅ 完了"
        f = fields_of(msg)
        assert f["シード"] == "7" and f["ステップ数"] == "3" and "テキスト CFG" in f
        assert f["この値の理由"].startswith("自動：")  # the auto preset explains itself in her language
        assert msg.embeds[0]["description"].startswith("**詳しい指示：**")
        assert msg.embeds[0]["footer"]["text"].startswith("ジョブ ")
        assert "ランダムなテスト用の重み" in msg.embeds[0]["footer"]["text"]
        assert labels(msg) == {"振り直し", "もっと強く", "元画像に近づける", "調整", "比較", "元に戻す", "削除"}
        assert (await bot.store.job_by_message(msg.id)).locale == "ja"

        # A re-roll pressed by her: its "why" is in Japanese as well.
        again = await finished(fake, await fake.click(alice, msg, button(msg, "reroll")))
        assert fields_of(again)["この値の理由"] == "振り直し：同じ設定、新しいシード"

        # Her own commands answer in Japanese too.
        history = await fake.slash(alice, channel, "history")
        await fake.wait_for(lambda: history.callbacks)
        embed = history.callbacks[0].data["embeds"][0]
        assert embed["title"] == "最近の編集" and embed["fields"][0]["value"].startswith("完了 · ")
        status = await fake.slash(alice, channel, "mgie status")
        await fake.wait_for(lambda: status.callbacks)
        embed = status.callbacks[0].data["embeds"][0]
        names = {f["name"]: f["value"] for f in embed["fields"]}
        assert embed["title"] == "MGIE の状態" and names["キュー"].startswith("待機 ")
        assert names["モデル"] == "準備完了" and "完了 2" in names["累計"]


async def test_public_notices_follow_the_server_and_a_reply_refine_its_users_language(fake_endpoints, tmp_path,
                                                                                      tiny_models):
    fake = fake_endpoints
    guild = fake.add_guild("Atelier", locale="fr")
    channel = fake.add_channel(guild, "retouches")
    alice, bob, owner = fake.add_user("alice", locale="ja"), fake.add_user("bob", locale="de"), fake.add_user("o")
    fake.add_member(guild, alice)
    fake.add_member(guild, bob)
    fake.add_member(guild, owner, permissions=perms.MANAGE_GUILD)
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))
        await bot.store.block_user(guild.id, bob.id, reason="", blocked_by=owner.id)

        # Bob (German) is refused in public: the notice is in the server's French, not his German.
        asked = await fake.send_message(bob, channel, "now make it red", reply_to=first)
        await fake.wait_for(lambda: [m for m in channel.messages if m.referenced is asked], timeout=30)
        notice = next(m for m in channel.messages if m.referenced is asked)
        assert notice.content.startswith("Tu ne peux pas utiliser MGIE sur ce serveur.")
        assert "Pendant les 5 prochaines minutes" in notice.content

        # Alice (Japanese) refines by replying, with no interaction to say her locale: her stored one is used.
        reply = await fake.send_message(alice, channel, "now make it night", reply_to=first)
        await fake.wait_for(lambda: [m for m in channel.messages if m.referenced is reply and m.attachments],
                            timeout=60)
        status = next(m for m in channel.messages if m.referenced is reply)
        assert ((status.history[0] if status.history else {"content": status.content}).get("content")
                or "").startswith("⏳ 待機中")
        result = next(m for m in channel.messages if m.referenced is reply and m.attachments)
        assert result.content.endswith("✅ 完了") and "調整" in fields_of(result)
        assert fields_of(result)["この値の理由"].startswith("前の編集の調整")


async def test_a_failed_edit_is_told_in_its_users_language(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    alice.locale = "pt-BR"
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        def out_of_memory(stage, job_ids):
            if stage in ("step", "retry"):
                raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

        inject_faults(bot.engine.workers[0], out_of_memory)
        inter = await edit(fake, alice, channel)
        await fake.wait_for(lambda: inter.original and (inter.original.content or "").startswith("❌"), timeout=60)
        assert inter.original.content.startswith(
            "❌ Não consegui terminar esta edição: A GPU ficou sem memória para esta edição")


async def test_a_french_moderator_configures_in_french(fake_endpoints, tmp_path, tiny_models):
    fake = fake_endpoints
    guild = fake.add_guild("Lab")
    channel = fake.add_channel(guild, "edits")
    owner = fake.add_user("owner", locale="fr")
    fake.add_member(guild, owner, permissions=perms.MANAGE_GUILD)
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        refused = await command(fake, owner, channel, "mgie-admin settings", {"max_steps": 500})
        assert refused == "Étapes max. doit être un nombre entier de 1 à 200 (reçu : 500)."
        done = await command(fake, owner, channel, "mgie-admin settings", {"max_steps": 20})
        assert done.startswith("**Réglages de MGIE**\nSalons : tous les salons\nÉtapes max. : 20\n")
        assert "Résultats signalés : spoiler" in done
