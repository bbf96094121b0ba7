"""A labelled PII corpus of the classes the world writes, generated from specifications: the
public IIN tables (card brands and lengths), the ITU numbering plans of the 30 most populous
countries, RFC 4291/5952/6874 (IPv6 text forms and zone ids), RFC 6531 (internationalised
e-mail) and RFC 5322 quoted local parts, the SSA's SSN rules, the SWIFT IBAN registry, and the
token formats providers document (AWS, GitHub, GitLab, Slack, Stripe, Google, ...).

Texts are written in several languages and containers (prose, JSON in text, code blocks,
markdown tables), often with several adjacent values, and hard negatives of every class
(order and tracking numbers, timestamps, versions, UUIDs, hashes, coordinates, ISBNs, IMEIs,
placeholders). Nothing here is taken from another project's test files.

`corpus(seed)` returns items `{"text", "gold": [[entity, start, end], ...], "class"}` with
character offsets. Seeds are fixed: the recognizers are tuned on one, measured on another.
"""
import base64
import json
import random
import string

from faker import Faker

ALNUM = string.ascii_letters + string.digits
rng = random.Random()
fake = Faker("en_US")
fake_eu = Faker(["en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT", "pl_PL", "pt_PT"])


def rand(chars, n):
    return "".join(rng.choice(chars) for _ in range(n))


def digits(n):
    return rand(string.digits, n)


# ---------------------------------------------------------------- cards (public IIN tables)
CARD_BRANDS = [
    # (prefixes, lengths)
    (["4"], [16, 16, 16, 13, 19]),                                    # Visa
    ([str(p) for p in range(51, 56)], [16]),                          # Mastercard
    ([str(p) for p in (2221, 2300, 2500, 2720)], [16]),               # Mastercard 2-series
    (["34", "37"], [15]),                                             # American Express
    (["300", "301", "305", "36", "38"], [14]),                        # Diners Club
    (["3528", "3550", "3589"], [16]),                                 # JCB
    (["6011", "644", "649", "65"], [16]),                             # Discover
    (["62"], [16, 17, 18, 19]),                                       # UnionPay
    (["5018", "5020", "5038", "6304", "6759", "6761", "6763"], [12, 13, 16, 19]),  # Maestro
    (["676770", "676774"], [16, 18]),                                 # Maestro UK
    (["1"], [15]),                                                    # UATP
    (["5019"], [16]),                                                 # Dankort
    (["2200", "2201", "2204"], [16]),                                 # Mir
    (["60", "652", "81", "82", "508"], [16]),                         # RuPay
    (["9792", "65"], [16]),                                           # Troy
    (["401178", "431274", "504175", "509000", "627780", "636368", "650031"], [16]),  # Elo
    (["606282", "3841"], [16, 19]),                                   # Hipercard
    (["506099", "507865"], [16, 19]),                                 # Verve
    (["2205"], [16]),                                                 # BORICA
    (["9860"], [16]),                                                 # Humo
    (["8600"], [16]),                                                 # UzCard
    (["31"], [19]),                                                   # China T-Union
    (["357111"], [16]),                                               # LankaPay
]


def luhn_digit(partial):
    total = 0
    for i, d in enumerate(reversed([int(c) for c in partial])):
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def luhn_ok(number):
    total = 0
    for i, d in enumerate(reversed([int(c) for c in number])):
        total += d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2)
    return total % 10 == 0


def card_number():
    prefixes, lengths = rng.choice(CARD_BRANDS)
    prefix, length = rng.choice(prefixes), rng.choice(lengths)
    partial = prefix + digits(length - len(prefix) - 1)
    return partial + luhn_digit(partial)


def group(number, sizes, sep):
    out, at = [], 0
    for size in sizes:
        out.append(number[at:at + size])
        at += size
    if at < len(number):
        out.append(number[at:])
    return sep.join(p for p in out if p)


def credit_card():
    number = card_number()
    style = rng.random()
    if style < 0.4:
        return number
    sep = rng.choice([" ", " ", "-", "."])
    if len(number) == 15 and number[:2] in ("34", "37"):
        return group(number, [4, 6, 5], sep)
    return group(number, [4] * 5, sep)


# ---------------------------------------------------------------- phones (ITU numbering plans)
# Country: calling code, national layouts ('#' a digit, 'N' 2-9, other characters literal).
# The leading `0`/`8` of a layout is the trunk prefix, dropped after the country code.
PHONE_PLANS = {
    "CN": ("86", ["13# #### ####", "15#########", "18#-####-####", "010-#### ####"]),
    "IN": ("91", ["9#### #####", "7#########", "022-#### ####"]),
    "US": ("1", ["(N##) N##-####", "N##-N##-####", "N##.N##.####", "N## N######", "1-N##-N##-####", "N##N######"]),
    "ID": ("62", ["0812-####-####", "0813 #### ###", "021-###-####"]),
    "PK": ("92", ["03##-#######", "042-########"]),
    "NG": ("234", ["080# ### ####", "0703 ### ####"]),
    "BR": ("55", ["(##) 9####-####", "(##) ####-####"]),
    "BD": ("880", ["01###-######"]),
    "RU": ("7", ["8 (9##) ###-##-##", "8-495-###-##-##"]),
    "ET": ("251", ["09# ### ####"]),
    "MX": ("52", ["55 #### ####", "33 #### ####"]),
    "JP": ("81", ["03-####-####", "090-####-####", "06-####-####"]),
    "EG": ("20", ["010 #### ####", "012########"]),
    "PH": ("63", ["0917 ### ####", "(02) 8### ####"]),
    "CD": ("243", ["081 ### ####"]),
    "VN": ("84", ["091 ### ## ##", "098#######"]),
    "IR": ("98", ["0912 ### ####"]),
    "TR": ("90", ["0532 ### ## ##", "(0212) ### ## ##"]),
    "DE": ("49", ["030 ########", "0151 ########", "030/#######", "(089) #######"]),
    "TH": ("66", ["081 ### ####", "02 ### ####"]),
    "GB": ("44", ["020 #### ####", "07### ######", "0161 ### ####"]),
    "TZ": ("255", ["07## ### ###"]),
    "FR": ("33", ["0N ## ## ## ##", "0N.##.##.##.##", "06########"]),
    "ZA": ("27", ["082 ### ####", "011 ### ####"]),
    "IT": ("39", ["3## ### ####", "02 #### ####", "06 #######"]),
    "KE": ("254", ["07## ######"]),
    "MM": ("95", ["09 ### ### ###"]),
    "CO": ("57", ["3## #######", "3## ### ####"]),
    "KR": ("82", ["010-####-####", "02-###-####"]),
    "ES": ("34", ["6## ## ## ##", "9## ### ###", "6########"]),
    "AR": ("54", ["011 15-####-####", "(011) ####-####"]),
    "PL": ("48", ["5## ### ###", "22 ### ## ##"]),
}


def fill(layout):
    return "".join(rng.choice("23456789") if c == "N" else (rng.choice(string.digits) if c == "#" else c)
                   for c in layout)


def plausible_digits(value):
    ds = [c for c in value if c.isdigit()]
    steps = {(int(b) - int(a)) % 10 for a, b in zip(ds, ds[1:])}
    return len(steps) > 1 or steps == set()


def phone():
    country = rng.choice(list(PHONE_PLANS))
    code, layouts = PHONE_PLANS[country]
    while True:
        national = fill(rng.choice(layouts))
        if plausible_digits(national):
            break
    style = rng.random()
    if style < 0.55:
        value = national
    else:
        # International: drop the trunk prefix, keep the grouping.
        rest = national.lstrip("(")
        if rest.startswith("0") or (country == "RU" and rest.startswith("8")):
            rest = rest[1:].lstrip(" -")
        rest = rest.replace(")", "").replace("(", "")
        if country in ("US",) and rest.startswith("1-"):
            rest = rest[2:]
        value = rng.choice(["+", "+", "00"]) + code + rng.choice([" ", " ", "-", ""]) + rest
        if country in ("GB", "DE") and rng.random() < 0.3:
            value = "+" + code + " (0)" + rest
    if rng.random() < 0.15:
        value += rng.choice([" ext. ", " x", "x", " EXT", " ext ", " #"]) + digits(rng.randint(2, 5))
    return value


# ---------------------------------------------------------------- SSNs, IBANs, IPs, e-mail
def ssn():
    while True:
        area = rng.randint(1, 899)
        if area != 666:
            break
    value = (f"{area:03d}", f"{rng.randint(1, 99):02d}", f"{rng.randint(1, 9999):04d}")
    sep = rng.choice(["-", "-", "-", " ", ".", "/"])
    return sep.join(value)


def iban():
    value = fake_eu.iban()
    style = rng.random()
    if style < 0.35:
        return value
    sep = rng.choice([" ", " ", "-", "."])
    return sep.join(value[i:i + 4] for i in range(0, len(value), 4))


def ip_address():
    kind = rng.randrange(10)
    if kind == 0:
        return fake.ipv4()
    if kind == 1:
        return fake.ipv4_private() + "/" + str(rng.choice([8, 16, 24, 32]))
    if kind == 2:
        return fake.ipv6()
    if kind == 3:
        full = fake.ipv6().split(":")
        cut = rng.randint(1, 5)
        return ":".join(full[:cut]) + "::" + ":".join(full[cut + 2:])
    if kind == 4:
        return "::1"
    if kind == 5:
        return "fe80::" + ":".join(rand("0123456789abcdef", 4) for _ in range(rng.randint(1, 4))) \
            + rng.choice(["%eth0", "%en0", "%wlan1", "%3"])
    if kind == 6:
        return rng.choice(["fe80::/10", "2001:db8::/32", "fc00::/7", "ff02::1", "2001:db8:" + rand("0123456789abcdef", 4) + "::/48"])
    if kind == 7:
        return "::ffff:" + fake.ipv4()
    if kind == 8:
        return fake.ipv4_public()
    return fake.ipv6().upper()


IDN_EMAILS = [
    ("用户", "例子.广告"), ("josé.garcía", "correo.es"), ("δοκιμή", "παράδειγμα.δοκιμή"),
    ("пользователь", "пример.рф"), ("müller", "bücher.de"), ("अजय", "उदाहरण.भारत"), ("θσερ", "εχαμπλε.ψομ"),
    ("测试", "公司.中国"), ("françois", "société.fr"), ("ユーザー", "例え.jp"),
]


def email():
    kind = rng.randrange(8)
    if kind <= 3:
        return rng.choice([fake.email, fake.free_email, fake.company_email])()
    if kind == 4:
        local, domain = rng.choice(IDN_EMAILS)
        return f"{local}{rng.randint(1, 99)}@{domain}"
    if kind == 5:
        return f"{fake.user_name()}@xn--{rand(string.ascii_lowercase, 5)}-{rand(string.ascii_lowercase + string.digits, 3)}." \
            + rng.choice(["com", "de", "xn--p1ai", "xn--fiqs8s"])
    if kind == 6:
        return f'"{fake.first_name().lower()} {fake.last_name().lower()}"@{fake.domain_name()}'
    return f"{fake.first_name().lower()}+{rand(string.ascii_lowercase, 4)}@{fake.domain_name()}"


# ---------------------------------------------------------------- secrets (provider formats)
def jwt():
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return ".".join([part({"alg": "RS256", "typ": "JWT"}), part({"sub": str(rng.randint(1, 10**9)), "iat": 1700000000}),
                     rand(ALNUM + "-_", 43)])


def secret_token():
    kind = rng.randrange(22)
    if kind == 0:
        return rng.choice(["AKIA", "ASIA"]) + rand(string.ascii_uppercase + "234567", 16)
    if kind == 1:
        return rng.choice(["sk-proj-", "sk-", "sk-svcacct-"]) + rand(ALNUM + "_-", 48)
    if kind == 2:
        return "sk-ant-api03-" + rand(ALNUM + "-_", 93) + "AA"
    if kind == 3:
        return rng.choice(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]) + rand(ALNUM, 36)
    if kind == 4:
        return "github_pat_" + rand(ALNUM, 22) + "_" + rand(ALNUM, 59)
    if kind == 5:
        return rng.choice(["glpat-", "gldt-", "glrt-", "glcbt-", "glptt-", "glft-", "glimt-", "glagent-", "glsoat-",
                           "glffct-", "gloas-"]) + rand(ALNUM + "_-", 20)
    if kind == 6:
        return "GR1348941" + rand(ALNUM + "_-", 20)
    if kind == 7:
        return rng.choice(["xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-"]) + digits(12) + "-" + digits(13) + "-" + rand(ALNUM, 24)
    if kind == 8:
        return "xapp-1-A" + rand(string.ascii_uppercase + string.digits, 10) + "-" + digits(13) + "-" + rand("0123456789abcdef", 64)
    if kind == 9:
        return "https://hooks.slack.com/services/T" + rand(string.ascii_uppercase + string.digits, 8) + "/B" \
            + rand(string.ascii_uppercase + string.digits, 10) + "/" + rand(ALNUM, 24)
    if kind == 10:
        return rng.choice(["sk_live_", "sk_test_", "rk_live_", "rk_test_"]) + rand(ALNUM, 24)
    if kind == 11:
        return "AIza" + rand(ALNUM + "-_", 35)
    if kind == 12:
        return jwt()
    if kind == 13:
        body = "\n".join(rand(ALNUM + "+/", 64) for _ in range(3))
        label = rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
        return f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n-----END {label}PRIVATE KEY-----"
    if kind == 14:
        return "hf_" + rand(string.ascii_letters, 34)
    if kind == 15:
        return "npm_" + rand(ALNUM, 36)
    if kind == 16:
        return "SG." + rand(ALNUM + "-_", 22) + "." + rand(ALNUM + "-_", 43)
    if kind == 17:
        return "xoxe.xoxp-1-" + rand(ALNUM, 40)
    if kind == 18:
        return "whsec_" + rand(ALNUM, 32)
    if kind == 19:
        return "dop_v1_" + rand("0123456789abcdef", 64)
    if kind == 20:
        return "shpat_" + rand("0123456789abcdef", 32)
    return "gsk_" + rand(ALNUM, 48)


def random_value(n):
    while True:
        value = rand(ALNUM + "+/_-!@%", n)
        if any(c.isdigit() for c in value) and any(c.isalpha() for c in value):
            return value


def secret_text():
    """A text with secrets, and their spans: a provider token, or an assignment, header, URL."""
    kind = rng.randrange(7)
    if kind <= 2:
        return None
    if kind == 3:
        key = rng.choice(["api_key", "API_KEY", "apiKey", "OPENAI_API_KEY", "client_secret", "auth_token", "SECRET_KEY",
                          "access_token", "db_password", "password", "PASSWD"])
        value = random_value(rng.randint(12, 40))
        quote = rng.choice(['"', "'", ""])
        op = rng.choice(["=", ": ", " = ", " := ", " => "])
        before = f"{key}{op}{quote}"
        return before, value, quote
    if kind == 4:
        value = rand(ALNUM + "-_.", rng.randint(24, 60))
        return "Authorization: Bearer ", value, ""
    if kind == 5:
        user = fake.user_name()
        password = random_value(rng.randint(10, 20)).replace("@", "#").replace("/", "_")
        scheme = rng.choice(["postgres", "mysql", "https", "redis", "amqp", "mongodb+srv"])
        return f"{scheme}://", f"{user}:{password}", f"@{fake.domain_name()}/{fake.word()}"
    key_id = "AKIA" + rand(string.ascii_uppercase + "234567", 16)
    secret = rand(ALNUM + "/+", 40)
    return ("aws", key_id, secret)


GENERATORS = {"email": email, "phone": phone, "credit_card": credit_card, "us_ssn": ssn, "iban": iban,
              "ip_address": ip_address, "secret": secret_token}
LISTABLE = ["phone", "credit_card", "us_ssn", "iban"]

LABELS = {
    "en": {"email": "email", "phone": "phone", "credit_card": "card number", "us_ssn": "SSN", "iban": "IBAN",
           "ip_address": "server IP", "secret": "API key"},
    "de": {"email": "E-Mail", "phone": "Telefon", "credit_card": "Kartennummer", "us_ssn": "SSN", "iban": "IBAN",
           "ip_address": "Server-IP", "secret": "API-Schlüssel"},
    "fr": {"email": "courriel", "phone": "téléphone", "credit_card": "numéro de carte", "us_ssn": "SSN",
           "iban": "IBAN", "ip_address": "adresse IP", "secret": "clé d'API"},
    "es": {"email": "correo", "phone": "teléfono", "credit_card": "número de tarjeta", "us_ssn": "SSN", "iban": "IBAN",
           "ip_address": "IP del servidor", "secret": "clave de API"},
    "pt": {"email": "e-mail", "phone": "telefone", "credit_card": "cartão", "us_ssn": "SSN", "iban": "IBAN",
           "ip_address": "IP do servidor", "secret": "chave de API"},
    "zh": {"email": "邮箱", "phone": "电话", "credit_card": "卡号", "us_ssn": "社保号", "iban": "IBAN",
           "ip_address": "服务器IP", "secret": "API密钥"},
    "ja": {"email": "メール", "phone": "電話番号", "credit_card": "カード番号", "us_ssn": "SSN", "iban": "IBAN",
           "ip_address": "サーバーIP", "secret": "APIキー"},
    "ru": {"email": "почта", "phone": "телефон", "credit_card": "номер карты", "us_ssn": "SSN", "iban": "IBAN",
           "ip_address": "IP сервера", "secret": "ключ API"},
}

SENTENCES = {
    "en": ["Please update my {label} to {v} before Friday.", "{name} ({v}) asked about the invoice.",
           "My {label} is {v}.", "Can you check why {v} was flagged?", "{v}", "I wrote it down as {v} - is that right?"],
    "de": ["Bitte ändern Sie meine {label} auf {v}.", "Meine {label} lautet {v}, danke.", "{name} ({v}) hat angerufen."],
    "fr": ["Mon {label} est {v}, merci.", "Pouvez-vous vérifier {v} ?", "{name} ({v}) a demandé la facture."],
    "es": ["Mi {label} es {v}.", "¿Puede verificar {v} por favor?", "{name} ({v}) preguntó por la factura."],
    "pt": ["Meu {label} é {v}.", "Pode confirmar o {label} {v}?"],
    "zh": ["我的{label}是{v}，请更新。", "请核对{label}：{v}", "{name}（{v}）询问了发票。"],
    "ja": ["私の{label}は{v}です。", "{label}：{v} を確認してください。"],
    "ru": ["Мой {label}: {v}, спасибо.", "Проверьте, пожалуйста, {v}."],
}

LIST_SEPARATORS = [" ", ", ", "\n", "; ", " / ", "\n- "]


def contained(parts):
    """Wraps values in a container. `parts` is a list of (text, entity or None); returns the list."""
    style = rng.randrange(5)
    if style == 0:
        return parts
    if style == 1:
        key = rng.choice(["value", "contact", "data", "field", "secret"])
        return [('{"user": "' + fake.user_name() + '", "' + key + '": "', None)] + parts + [('"}', None)]
    if style == 2:
        lang = rng.choice(["python", "bash", "yaml", "json", ""])
        return [(f"```{lang}\nvalue = \"", None)] + parts + [('"\n```', None)]
    if style == 3:
        return [(f"| {fake.first_name()} | ", None)] + parts + [(f" | {rng.randint(1, 99)} |", None)]
    return [("> ", None)] + parts


def positive(entity):
    lang = rng.choice(list(SENTENCES))
    template = rng.choice(SENTENCES[lang])
    label = LABELS[lang][entity]
    before, after = template.split("{v}")
    name = fake.name()
    values = []
    if entity in LISTABLE and rng.random() < 0.3:
        count = rng.randint(2, 4)
        sep = rng.choice(LIST_SEPARATORS)
        for i in range(count):
            if i:
                values.append((sep, None))
            values.append((GENERATORS[entity](), entity))
    elif entity == "secret":
        special = secret_text()
        if special is None:
            values = [(secret_token(), "secret")]
        elif special[0] == "aws":
            _, key_id, key = special
            values = [("aws_access_key_id = ", None), (key_id, "secret"), ("\naws_secret_access_key = ", None),
                      (key, "secret")]
        else:
            head, value, tail = special
            values = [(head, None), (value, "secret"), (tail, None)]
    else:
        values = [(GENERATORS[entity](), entity)]
    parts = [(before.format(label=label, name=name), None)] + contained(values) \
        + [(after.format(label=label, name=name), None)]
    return parts


def failed_iban(rng, faker):
    """A registered IBAN with its check digits changed (fails mod-97), in a sentence."""
    value = faker.iban()
    check = (int(value[2:4]) + rng.randint(1, 50)) % 97 + 2
    return f"Account {value[:2]}{check:02d}{value[4:]} was rejected."


def never_issued_ssn(rng, areas):
    """An SSN from an area the SSA never issues, in a sentence."""
    return f"Invalid SSN {rng.choice(areas)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}."


def hard_negative():
    kind = rng.randrange(24)
    if kind == 0:
        return f"Order #{rng.randint(10**7, 10**10)} shipped on {fake.date()}."
    if kind == 1:
        return f"The job finished at {fake.date_time().isoformat()}Z (epoch {rng.randint(1500000000, 1800000000)})."
    if kind == 2:
        return f"Upgrade to v{rng.randint(1, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 99)} before {fake.date()}."
    if kind == 3:
        while True:
            number = card_number()
            bad = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
            if not luhn_ok(bad):
                break
        return f"Reference {' '.join(bad[i:i + 4] for i in range(0, len(bad), 4))} is not a card."
    if kind == 4:
        return failed_iban(rng, fake_eu)
    if kind == 5:
        return never_issued_ssn(rng, ["000", "666", "912", "987"])
    if kind == 6:
        return f"Request id {fake.uuid4()} took {rng.randint(10, 999)} ms."
    if kind == 7:
        return f"commit {rand('0123456789abcdef', 40)} (sha256 {rand('0123456789abcdef', 64)})"
    if kind == 8:
        return f"Meet at {fake.latitude():.6f}, {fake.longitude():.6f} or {rng.uniform(-90, 90):.4f} {rng.uniform(-180, 180):.4f}."
    if kind == 9:
        isbn12 = "978" + digits(9)
        total = sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(isbn12))
        isbn = isbn12 + str((10 - total % 10) % 10)
        return f"ISBN {isbn[:3]}-{isbn[3]}-{isbn[4:7]}-{isbn[7:12]}-{isbn[12]} or ISBN {isbn}"
    if kind == 10:
        return f"Tracking 1Z{rand(string.ascii_uppercase + string.digits, 16)}, USPS {digits(4)} {digits(4)} {digits(4)} " \
               f"{digits(4)} {digits(4)} {digits(2)}, FedEx {digits(12)}"
    if kind == 11:
        partial = "35" + digits(12)
        return f"IMEI {partial + luhn_digit(partial)} registered."
    if kind == 12:
        return f"Device MAC {fake.mac_address()} rebooted at {fake.time()}; std::vector<int> and Foo::Bar."
    if kind == 13:
        return rng.choice(["Use key AKIAIOSFODNN7EXAMPLE with secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY.",
                           "api_key = \"YOUR_API_KEY\"", "password: ********", "token=xxxxxxxxxxxxxxxxxxxxxxxx",
                           "export OPENAI_API_KEY=sk-...", "Authorization: Bearer <token>",
                           "https://user:password@example.com/path", "secret = os.environ['SECRET_KEY']",
                           "password = \"${DB_PASSWORD}\"", "github token ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"])
    if kind == 14:
        return f"Call 1234567890 or 555-555-5555 for the demo; test number 0000000000."
    if kind == 15:
        return f"Total: ${rng.randint(1, 99)},{rng.randint(100, 999)}.{rng.randint(10, 99)} due {fake.date(pattern='%m/%d/%Y')}"
    if kind == 16:
        return f"Revenue: {rng.randint(1, 999)} {rng.randint(100, 999)} {rng.randint(100, 999)} EUR, " \
               f"{rng.randint(1, 9)}.{rng.randint(100, 999)}.{rng.randint(100, 999)}.{rng.randint(100, 999)} units"
    if kind == 17:
        return f"Routing number {digits(9)}, build {rng.randint(1000, 99999)}, PO {digits(8)}"
    if kind == 18:
        return f"Dates: {fake.date(pattern='%d.%m.%Y')}, {fake.date(pattern='%Y-%m-%d')} {fake.time()}, " \
               f"{fake.date(pattern='%d/%m/%Y')}"
    if kind == 19:
        return f"Install pkg@{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}; mail admin@localhost; see @{fake.user_name()}"
    if kind == 20:
        return f"Version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 999)} on port {rng.randint(1024, 65535)}"
    if kind == 21:
        return f"The token count was {rng.randint(100, 99999)} and the password policy requires {rng.randint(8, 16)} characters."
    if kind == 22:
        return f"Serial: {rand(string.ascii_uppercase, 2)}{digits(10)}; SKU {digits(12)}; EAN {digits(13)}"
    return f"| id | value |\n|---|---|\n| {rng.randint(1, 999)} | {rng.randint(10**5, 10**9)} |"


def assemble(parts):
    text, gold = "", []
    for piece, entity in parts:
        if entity:
            gold.append([entity, len(text), len(text) + len(piece)])
        text += piece
    return text, gold


def corpus(seed, per_entity=400, negatives=1200):
    rng.seed(seed)
    Faker.seed(seed)
    items = []
    for entity in GENERATORS:
        for _ in range(per_entity):
            text, gold = assemble(positive(entity))
            items.append({"text": text, "gold": gold})
    for _ in range(negatives):
        items.append({"text": hard_negative(), "gold": []})
    return items
