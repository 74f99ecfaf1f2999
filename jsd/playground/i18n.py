"""The playground's words, in Japanese and English: Japanese for a Japanese browser, English for every other.

Labels are translated in the browser by Gradio's ``gr.I18n`` (it reads ``navigator.language``); messages made
in Python (errors, progress, the token report) follow the request's ``Accept-Language`` with :func:`language`.
"""

from __future__ import annotations

MESSAGES: dict[str, dict[str, str]] = {
    "ja": {
        "title": "日本語 Stable Diffusion プレイグラウンド",
        "intro": "プロンプトを入力して「生成」(Ctrl+Enter)。サーバー: {url}",
        "generate": "生成",
        "cancel": "キャンセル",
        "reuse_seed": "選んだ画像のシードを使う",
        "gallery": "結果",
        "downloads": "ダウンロード(サーバーが返したファイルそのまま)",
        "advanced": "詳細設定",
        "paint_hint": "画像をアップロードし、ブラシで塗った部分を描き直します(インペイント)",
        "seed_caption": "シード {seed}",
        "running": "生成中…",
        "steps": "ステップ",
        "done": "{count} 枚を生成しました({seconds:.1f} 秒、予測 {prediction})。",
        "canceled": "キャンセルしました。サーバーは次のリクエストを受け付けます。",
        "failed": "エラー: {error}",
        "invalid": "入力エラー: {error}",
        "http": "サーバーが HTTP {status} を返しました: {error}",
        "down": "サーバー {url} に接続できません(停止しているか、起動中です)。",
        "setup_failed": "サーバー {url} のセットアップが失敗しました(SETUP_FAILED)。セットアップログの末尾:",
        "starting": "サーバー {url} は起動中です({status})。しばらくしてから再度お試しください。",
        "ready": "サーバー {url}: 準備完了",
        "busy": "サーバー {url}: 別の予測を実行中",
        "not_image": "`{name}`: アップロードされたファイル {file} は画像として読めません"
        "(PNG・JPEG・WebP を使ってください)。",
        "no_seed": "シードを使うには、先に画像を生成してください。",
        "tokens": "トークン: {pieces} ピース、{chunks} チャンク。",
        "truncated": "切り捨てられたテキスト: 「{text}」({count} ピース)",
        "truncated_count": "{count} ピースが切り捨てられました。",
        "not_truncated": "切り捨てなし。",
    },
    "en": {
        "title": "Japanese Stable Diffusion playground",
        "intro": "Type a prompt and press Generate (Ctrl+Enter). Server: {url}",
        "generate": "Generate",
        "cancel": "Cancel",
        "reuse_seed": "Reuse the selected image's seed",
        "gallery": "Results",
        "downloads": "Downloads (the server's files, unchanged)",
        "advanced": "Advanced settings",
        "paint_hint": "Upload an image; what you paint with the brush is repainted (inpainting)",
        "seed_caption": "seed {seed}",
        "running": "Generating…",
        "steps": "steps",
        "done": "Generated {count} image(s) in {seconds:.1f} s (prediction {prediction}).",
        "canceled": "Canceled. The server takes the next request.",
        "failed": "Error: {error}",
        "invalid": "Invalid input: {error}",
        "http": "The server answered HTTP {status}: {error}",
        "down": "Cannot reach the server {url} (it is stopped or still starting).",
        "setup_failed": "The server {url} failed its setup (SETUP_FAILED). The end of its setup log:",
        "starting": "The server {url} is starting ({status}); try again in a moment.",
        "ready": "Server {url}: ready",
        "busy": "Server {url}: running another prediction",
        "not_image": "`{name}`: the uploaded file {file} cannot be read as an image (use PNG, JPEG or WebP).",
        "no_seed": "Generate an image first, then reuse its seed.",
        "tokens": "Tokens: {pieces} pieces in {chunks} chunk(s).",
        "truncated": "Truncated text: “{text}” ({count} pieces)",
        "truncated_count": "{count} pieces were truncated.",
        "not_truncated": "Nothing truncated.",
    },
}

# Labels of the model's known inputs; an input the table does not know is labelled with its own name.
FIELD_LABELS: dict[str, dict[str, str]] = {
    "ja": {
        "prompt": "プロンプト",
        "negative_prompt": "ネガティブプロンプト",
        "prompt_weighting": "強調記法 (text:1.3)",
        "width": "幅",
        "height": "高さ",
        "num_outputs": "枚数",
        "num_inference_steps": "ステップ数",
        "guidance_scale": "ガイダンススケール",
        "scheduler": "スケジューラー",
        "seed": "シード(空欄でランダム)",
        "image": "画像(img2img / インペイント)",
        "mask": "マスク画像(白が描き直し)",
        "prompt_strength": "画像の変化量",
        "output_format": "ファイル形式",
        "output_quality": "画質",
        "disable_safety_checker": "セーフティチェッカーを無効にする",
        "lora_weights": "LoRA",
        "lora_scale": "LoRA の強さ",
        "fast_mode": "高速モード",
    },
    "en": {
        "seed": "seed (empty: random)",
        "image": "image (img2img / inpainting)",
        "mask": "mask (white is repainted)",
    },
}


def language(accept_language: str | None) -> str:
    """``ja`` when the browser's first language is Japanese, else ``en`` (the fallback)."""
    first = (accept_language or "").split(",")[0].strip().lower()
    return "ja" if first.startswith("ja") else "en"


def message(lang: str, key: str, **values) -> str:
    return MESSAGES.get(lang, MESSAGES["en"])[key].format(**values)


def field_label(lang: str, name: str) -> str:
    """``プロンプト (prompt)``: the input's own name always shows, as the API and the CLI spell it."""
    label = FIELD_LABELS.get(lang, {}).get(name)
    return f"{label} ({name})" if label and lang == "ja" else (label or name)


def gradio_translations() -> dict[str, dict[str, str]]:
    """``gr.I18n``'s tables: the static words and the field labels, keyed ``field.NAME``."""
    return {
        lang: MESSAGES[lang] | {f"field.{name}": field_label(lang, name) for name in FIELD_LABELS["ja"]}
        for lang in MESSAGES
    }
