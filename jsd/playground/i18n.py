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
        "lost": "サーバー {url} が生成の途中で停止しました。再起動したら、もう一度「生成」を押してください。",
        "waiting": "順番待ち: サーバーは別の予測を実行中です",
        "too_long": "`{name}`: {count:,} 文字あります。最大 {limit:,} 文字までです(「{start}…」)。",
        "done_seeds": "シード: {seeds}。",
        "seed_set": "シード {seed} をフォームの「シード」に入れました。",
        "settings_loaded": "{file} の設定をフォームに読み込みました: {names}。",
        "no_settings": "{file} には jsd の設定が埋め込まれていません"
        "(jsd が保存した PNG・WebP・JPEG を使ってください)。",
        "settings_file": "画像から設定を読み込む(jsd が保存した PNG・WebP・JPEG)",
        "history": "履歴(クリックでフォームに読み込み)",
        "history_loaded": "履歴の設定をフォームに読み込みました(シード {seed})。",
        "drop_not_image": "画像ではないファイル「{file}」は使えません(PNG・JPEG・WebP を使ってください)。",
        "error_input": "入力 `{name}` の値が受け付けられませんでした: {detail}",
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
        "lost": "The server {url} stopped in the middle of the run. Once it is back, press Generate again.",
        "waiting": "Waiting: the server is running another prediction",
        "too_long": "`{name}` has {count:,} characters; at most {limit:,} are allowed (“{start}…”).",
        "done_seeds": "Seeds: {seeds}.",
        "seed_set": "Seed {seed} is now in the form's seed field.",
        "settings_loaded": "Loaded the settings of {file} into the form: {names}.",
        "no_settings": "{file} has no settings embedded by jsd (use a PNG, WebP or JPEG that jsd saved).",
        "settings_file": "Settings from an image (a PNG, WebP or JPEG that jsd saved)",
        "history": "History (click to load into the form)",
        "history_loaded": "Loaded the settings of a history entry into the form (seed {seed}).",
        "drop_not_image": "“{file}” is not an image (use PNG, JPEG or WebP).",
        "error_input": "The server did not accept `{name}`: {detail}",
    },
}

# Labels of the model's known inputs; an input the table does not know is labelled with its own name.
FIELD_LABELS: dict[str, dict[str, str]] = {
    "ja": {
        "prompt": "プロンプト",
        "negative_prompt": "ネガティブプロンプト",
        "prompt_weighting": "強調記法 (テキスト:1.3)",
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
        "num_candidates": "候補数 (best-of-N)",
    },
    "en": {
        "seed": "seed (empty: random)",
        "image": "image (img2img / inpainting)",
        "mask": "mask (white is repainted)",
    },
}


# The schema's descriptions in Japanese, keyed by input name. An input missing here shows the schema's English
# description (tests/test_playground.py lists such inputs): add its Japanese line when adding it to predict.py.
FIELD_DESCRIPTIONS: dict[str, str] = {
    "prompt": "描きたいもの(日本語で、最大 2,000 文字。タブ・改行以外の制御文字は使えません)。",
    "negative_prompt": "描きたくないもの(最大 2,000 文字)。",
    "prompt_weighting": "`prompt` と `negative_prompt` の (テキスト:1.3) や（テキスト：１．３）を"
    "強調の重みとして読みます。"
    "オフ: 括弧はただの文字です。括弧そのものは \\( や \\) と書きます。",
    "width": "出力画像の幅(ピクセル)。",
    "height": "出力画像の高さ(ピクセル)。",
    "num_outputs": "画像の枚数。幅 × 高さ × 枚数は 2,359,296 ピクセル(768×768 を 4 枚)以内。",
    "num_inference_steps": "ノイズ除去のステップ数。",
    "guidance_scale": "プロンプトにどれだけ忠実に従うか(classifier-free guidance)。",
    "scheduler": "サンプラー。",
    "seed": "1 枚目のシード。i 枚目はシード + i を使います。空欄ならランダム。",
    "image": "img2img の元画像(幅 × 高さに合わせて縮小・拡大)。",
    "mask": "`image` のインペイント用マスク。白は描き直し、黒はそのまま。",
    "prompt_strength": "`image`(またはマスク部分)をどれだけ描き直すか。1.0 ですべて描き直します。",
    "output_format": "画像ファイルの形式。",
    "output_quality": "webp・jpg の画質(png は可逆)。",
    "disable_safety_checker": "セーフティチェッカーが NSFW と判定する画像も返します。",
    "lora_weights": "このリクエストの LoRA: http(s) URL、データ URI、またはトレーナーの .tar か .safetensors"
    "(diffusers 形式・kohya 形式)のパス。空欄: 学習済みバージョンの LoRA、なければベースモデル。",
    "lora_scale": "LoRA の強さ。0 でベースモデルと同じ画像になります。",
    "num_candidates": "best-of-N: 1 枚につきこの数の候補を生成し、rinna の日本語 CLIP がプロンプトに最も合うと"
    "判定した 1 枚を返します(重みにスコアラーが必要。なければ 1 のみ)。候補 N 個で生成時間は約 N 倍。1: 通常の生成。",
    "fast_mode": "高速モード: 重みフォルダーの高速化 LoRA(LCM-LoRA、TCD-LoRA、Hyper-SD 4 ステップ、またはこのモデル用に"
    "蒸留した jsd-lcm)を専用のサンプラー・4 ステップ・ガイダンスなしで使います(約 6 倍速)。ステップ数・ガイダンス"
    "スケール・スケジューラーを既定値のままにすると高速モードの設定になります。9 ステップ以上やガイダンス 2 超は"
    "受け付けません。`lora_weights` と併用できます。SD 1.5 用なので、このモデルでの画質への影響は未測定です。"
    "off: 使いません。",
}

# Gradio's own words (its image editor, file list and gallery) that its Japanese table leaves in English; the
# keys are Gradio's (gradio/templates/frontend: ``image_editor.*``, ``common.*``, ...).
GRADIO_JA: dict[str, str] = {
    f"image_editor.{key}": word
    for key, word in {
        "add_layer": "レイヤーを追加",
        "brush": "ブラシ",
        "brush_size": "ブラシのサイズ",
        "clear_canvas": "キャンバスをクリア",
        "color": "色",
        "confirm_crop": "切り抜きを確定",
        "crop": "切り抜き",
        "erase": "消しゴム",
        "eraser_size": "消しゴムのサイズ",
        "fit_to_screen": "画面に合わせる",
        "layer": "レイヤー",
        "layers": "レイヤー",
        "pan": "移動",
        "paste": "貼り付け",
        "redo": "やり直す",
        "resize": "サイズ変更",
        "save_changes": "変更を保存",
        "select_draw_tool": "描画ツールを選んで始めてください",
        "show_layers": "レイヤーを表示",
        "upload": "アップロード",
        "upload_image": "画像をアップロード",
        "webcam": "Web カメラ",
        "zoom_in": "拡大",
        "zoom_out": "縮小",
    }.items()
} | {
    "common.download_all": "すべてダウンロード",
    "common.complete": "完了",  # the status tracker announces it; no Gradio table has it
    "common.runs": "実行",
    "common.progress": "進行状況",
    "common.record": "録音",
    "common.stop_recording": "録音を停止",
}

# Gradio's words written into its components in English, outside its translation tables (aria-labels, tooltips):
# the page's script puts these in their place in a Japanese browser (app.PAGE_JS), as exact texts or patterns.
GRADIO_FIXED_JA: dict[str, str] = {
    "Click to upload or drop files": "クリックしてアップロード、またはファイルをドロップ",
    "Close": "閉じる",
    "Fullscreen": "全画面表示",
    "Exit fullscreen mode": "全画面表示を終了",
    "Exit fullscreen": "全画面表示を終了",
    "Reset to default value": "初期値に戻す",
    "detailed view of selected image": "選んだ画像の拡大表示",
    "undo": "元に戻す",
    "Undo": "元に戻す",
    "Redo": "やり直す",
    "Download": "ダウンロード",
    "Share": "共有",
    "Clear": "クリア",
    "Remove": "削除",
    "Copy": "コピー",
    "Copied": "コピーしました",
    "Error": "エラー",
}
GRADIO_PATTERNS_JA: list[tuple[str, str]] = [
    (r"^Thumbnail (\d+) of (\d+)$", "サムネイル $1 / $2"),
    (r"^number input for (.*)$", "$1 の数値入力"),
    (r"^range slider for (.*)$", "$1 のスライダー"),
    (r"^Select (.*)$", "$1 を選ぶ"),
]

# The server's English errors, in Japanese: (pattern, template with the pattern's groups). jsd.serving and
# coglet write them; an error no pattern matches is shown as ``error_input`` around the server's own words.
SERVER_ERRORS_JA: list[tuple[str, str]] = [
    (
        r"`(?P<name>\w+)` contains the control character U\+(?P<code>[0-9A-F]{4,6}) at position (?P<pos>\d+).*",
        "`{name}` の {pos} 文字目に制御文字 U+{code} があります。"
        "タブ・改行・復帰以外の制御文字は使えません。削除してください。",
    ),
    (
        r"`(?P<name>\w+)` contains an unpaired surrogate U\+(?P<code>[0-9A-F]{4}) at position (?P<pos>\d+).*",
        "`{name}` の {pos} 文字目に不正な文字 U+{code} があります。削除してください。",
    ),
    (
        r"`width` × `height` × `num_outputs` = .*?(?P<total>[\d,]+) pixels.*?(?P<limit>[\d,]+).*",
        "`width` × `height` × `num_outputs` が {total} ピクセルで、上限 {limit} ピクセルを超えています。"
        "サイズか枚数(`num_outputs`)を減らしてください。",
    ),
    (
        r"`(?P<name>\w+)` has (?P<count>[\d,]+) characters; at most (?P<limit>[\d,]+) are allowed.*",
        "`{name}` は {count} 文字あります。最大 {limit} 文字までです。短くしてください。",
    ),
    (
        r"`(?P<name>\w+)` must be between (?P<low>\S+) and (?P<high>\S+), got (?P<value>.*?)\.?",
        "`{name}` は {low} から {high} の範囲で指定してください(入力値: {value})。",
    ),
    (
        r"`(?P<name>\w+)` could not be read as an image.*",
        "`{name}` を画像として読めません(PNG・JPEG・WebP を使ってください)。",
    ),
    (
        r"`mask` was given without `image`.*",
        "`mask` だけが指定されています。インペイントには描き直す元画像 `image` が必要です。",
    ),
    (
        r"`(?P<name>\w+)`: (?P<value>.*) is (?:less|greater) than the (?:minimum|maximum) of (?P<bound>\S+)",
        "`{name}`: {value} は範囲外です(限界値 {bound})。",
    ),
    (
        r"`(?P<name>\w+)`: .* is longer than (?P<limit>\d+) characters",
        "`{name}` が長すぎます(最大 {limit} 文字)。",
    ),
]


def server_error(lang: str, text: str) -> str:
    """The server's English error in ``lang``: a known pattern translated, else the text as it came."""
    import re

    if lang != "ja":
        return text
    for pattern, template in SERVER_ERRORS_JA:
        match = re.fullmatch(pattern, text.strip(), flags=re.DOTALL)
        if match:
            return template.format(**match.groupdict())
    name = re.match(r"`(\w+)`", text.strip())
    return message(lang, "error_input", name=name.group(1), detail=text) if name else text


def field_description(lang: str, name: str, english: str) -> str:
    """The input's description in ``lang``; the schema's English one when no translation exists yet."""
    return FIELD_DESCRIPTIONS.get(name, english) if lang == "ja" else english


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
    tables = {
        lang: MESSAGES[lang] | {f"field.{name}": field_label(lang, name) for name in FIELD_LABELS["ja"]}
        for lang in MESSAGES
    }
    tables["ja"] |= GRADIO_JA
    return tables
