# deploybot in an AWS account: one Fargate task in private subnets behind an HTTPS load
# balancer, its store in an encrypted RDS PostgreSQL, its secrets in Secrets Manager, its logs in
# CloudWatch. The task's own role may do one thing: assume the plan role or the apply role.
# See README.md for the variables, the outputs and the order of first-time setup.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_id     = data.aws_caller_identity.current.account_id
  partition      = data.aws_partition.current.partition
  region         = data.aws_region.current.name
  public_url     = "https://${var.domain_name}"
  container_name = "deploybot"
  data_dir       = "/var/lib/deploybot"
  uid            = 10001 # the image's deploybot user (deploy/Dockerfile)
  tags           = merge({ "app" = var.name }, var.tags)

  # Secrets, created empty here and filled in by you (their values never pass through
  # Terraform or its state). ECS hands each to the container as the environment variable
  # that overrides that config field; none appears in the task definition.
  secret_specs = {
    "github-private-key"    = { env = "DEPLOYBOT_GITHUB__PRIVATE_KEY", enabled = var.github_app_id > 0, description = "The GitHub App's private key (PEM)" }
    "github-webhook-secret" = { env = "DEPLOYBOT_GITHUB__WEBHOOK_SECRET", enabled = var.github_app_id > 0, description = "The GitHub App's webhook secret" }
    "gitlab-token"          = { env = "DEPLOYBOT_GITLAB__TOKEN", enabled = var.gitlab_enabled, description = "The GitLab access token (api, read_repository)" }
    "gitlab-webhook-secret" = { env = "DEPLOYBOT_GITLAB__WEBHOOK_SECRET", enabled = var.gitlab_enabled, description = "The GitLab webhook secret token" }
    "slack-signing-secret"  = { env = "DEPLOYBOT_SLACK__SIGNING_SECRET", enabled = var.slack_enabled, description = "The Slack app's signing secret" }
    "slack-webhook-url"     = { env = "DEPLOYBOT_SLACK__WEBHOOK_URL", enabled = var.slack_enabled, description = "The Slack incoming webhook URL" }
  }
  enabled_secrets = { for key, spec in local.secret_specs : key => spec if spec.enabled }
  container_secrets = merge(
    { for key, spec in local.enabled_secrets : spec.env => aws_secretsmanager_secret.this[key].arn },
    var.extra_secrets,
    { PGPASSWORD = "${local.database_secret_arn}:password::" },
  )
  # The database's password: made and kept by RDS in Secrets Manager, handed to the bot as libpq's
  # PGPASSWORD (never in the URL, the task definition or Terraform's state).
  database_secret_arn = aws_db_instance.this.master_user_secret[0].secret_arn
  module_secret_arns = concat([for secret in aws_secretsmanager_secret.this : secret.arn],
  [for secret in aws_secretsmanager_secret.runner_token : secret.arn], [local.database_secret_arn])

  # Plain configuration: nothing secret here (tests/test_deploy_module.py checks the names).
  base_environment = {
    DEPLOYBOT_SERVER__HOST       = "0.0.0.0"
    DEPLOYBOT_SERVER__PORT       = tostring(var.container_port)
    DEPLOYBOT_SERVER__PUBLIC_URL = local.public_url
    DEPLOYBOT_SERVER__DATA_DIR   = local.data_dir
    # The store (saved plans included) is in RDS; the data dir holds only caches: mirrors,
    # working dirs, running jobs' files and logs.
    DEPLOYBOT_SERVER__DATABASE_URL = "postgresql://${aws_db_instance.this.username}@${aws_db_instance.this.address}:${aws_db_instance.this.port}/${aws_db_instance.this.db_name}?sslmode=require"
    DEPLOYBOT_POLICY_FILE          = var.policy_file
    # The bot runs no terraform and holds no AWS credentials: each phase goes to its pool of
    # runners (runners.tf), whose task role is the phase's role. The policy names the pools.
    DEPLOYBOT_RUNNERS__POOLS = jsonencode({ for pool in keys(local.runner_pools) : pool => pool })
    TMPDIR                   = "/tmp"
  }
  github_environment = {
    DEPLOYBOT_GITHUB__APP_ID    = tostring(var.github_app_id)
    DEPLOYBOT_GITHUB__API_URL   = var.github_api_url
    DEPLOYBOT_GITHUB__BOT_LOGIN = var.github_bot_login
  }
  gitlab_environment = {
    DEPLOYBOT_GITLAB__URL          = var.gitlab_url
    DEPLOYBOT_GITLAB__BOT_USERNAME = var.gitlab_bot_username
  }
  environment = merge(
    local.base_environment,
    var.github_app_id > 0 ? local.github_environment : {},
    var.gitlab_enabled ? local.gitlab_environment : {},
    var.extra_environment,
  )

  container = {
    name                   = local.container_name
    image                  = var.container_image
    essential              = true
    user                   = "${local.uid}:${local.uid}"
    readonlyRootFilesystem = true
    portMappings           = [{ containerPort = var.container_port, protocol = "tcp" }]
    environment            = [for name in sort(keys(local.environment)) : { name = name, value = local.environment[name] }]
    secrets                = [for name in sort(keys(local.container_secrets)) : { name = name, valueFrom = local.container_secrets[name] }]
    mountPoints = [
      { sourceVolume = "data", containerPath = local.data_dir, readOnly = false },
      { sourceVolume = "tmp", containerPath = "/tmp", readOnly = false },
    ]
    linuxParameters = { capabilities = { drop = ["ALL"] } }
    # ECS stops a task with SIGTERM, then SIGKILL after this many seconds (Fargate's most):
    # the time a running apply gets to finish on shutdown.
    stopTimeout = 120
    # No container healthCheck (nor ECS Exec): each check would start a process holding the
    # container's environment, secrets included, beside the terraform that plans run. The
    # load balancer's check of /healthz is the health check; ECS replaces a task that fails it.
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.this.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "deploybot"
      }
    }
  }

  # An image in ECR gets pull rights for exactly its repository; other public images need none.
  ecr_image          = try(regex("^([0-9]{12})[.]dkr[.]ecr[.]([a-z0-9-]+)[.]amazonaws[.]com(?:[.]cn)?/([^:@]+)", var.container_image), null)
  ecr_repository_arn = try(format("arn:%s:ecr:%s:%s:repository/%s", local.partition, local.ecr_image[1], local.ecr_image[0], local.ecr_image[2]), null)

  plan_role_policy_arns = var.plan_role_policy_arns != null ? var.plan_role_policy_arns : ["arn:${local.partition}:iam::aws:policy/ReadOnlyAccess"]
}

# -- network: 443 from allowed networks to the load balancer, the load balancer to the task,
# -- the task to its database and to HTTPS. Terraform removes the default allow-all egress rule of
# -- each new security group, so these rules are all there is.

resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "deploybot load balancer: HTTPS in from allowed networks only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-alb" })
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = toset(var.allowed_ingress_cidrs)

  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from an allowed network"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "alb_to_task" {
  security_group_id            = aws_security_group.alb.id
  description                  = "To the deploybot task"
  ip_protocol                  = "tcp"
  from_port                    = var.container_port
  to_port                      = var.container_port
  referenced_security_group_id = aws_security_group.task.id
  tags                         = local.tags
}

resource "aws_security_group" "task" {
  name        = "${var.name}-task"
  description = "deploybot task: in from its load balancer only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-task" })
}

resource "aws_vpc_security_group_ingress_rule" "task_from_alb" {
  security_group_id            = aws_security_group.task.id
  description                  = "From the deploybot load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.container_port
  to_port                      = var.container_port
  referenced_security_group_id = aws_security_group.alb.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "task_https" {
  for_each = toset(var.task_egress_cidrs)

  security_group_id = aws_security_group.task.id
  description       = "HTTPS: forges, AWS APIs, Terraform providers"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "task_to_db" {
  security_group_id            = aws_security_group.task.id
  description                  = "PostgreSQL: deploybot's store"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_security_group.db.id
  tags                         = local.tags
}

resource "aws_security_group" "db" {
  name        = "${var.name}-db"
  description = "deploybot database: PostgreSQL from the deploybot task only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-db" })
}

resource "aws_vpc_security_group_ingress_rule" "db_from_task" {
  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the deploybot task"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_security_group.task.id
  tags                         = local.tags
}

# -- HTTPS load balancer: only the routes GitHub, GitLab, CI and Slack call are forwarded;
# -- /metrics, /readyz and everything else answer 404 at the load balancer.

resource "aws_lb" "this" {
  name                       = var.name
  load_balancer_type         = "application"
  internal                   = var.internal_load_balancer
  subnets                    = var.load_balancer_subnet_ids
  security_groups            = [aws_security_group.alb.id]
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  idle_timeout               = 120 # run logs stream while terraform works
  tags                       = local.tags

  dynamic "access_logs" {
    for_each = var.access_logs_bucket == null ? [] : [var.access_logs_bucket]
    content {
      bucket  = access_logs.value
      prefix  = var.name
      enabled = true
    }
  }
}

resource "aws_lb_target_group" "this" {
  name                 = var.name
  port                 = var.container_port
  protocol             = "HTTP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = 30
  tags                 = local.tags

  health_check {
    path                = "/healthz"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn
  tags              = local.tags

  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "text/plain"
      message_body = "Not Found"
      status_code  = "404"
    }
  }
}

resource "aws_lb_listener_rule" "deploybot" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 100
  tags         = local.tags

  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }

  condition {
    path_pattern {
      values = ["/webhooks/*", "/api/v1/*", "/slack/interactions"]
    }
  }
}

resource "aws_wafv2_web_acl_association" "this" {
  count = var.waf_web_acl_arn == null ? 0 : 1

  resource_arn = aws_lb.this.arn
  web_acl_arn  = var.waf_web_acl_arn
}

resource "aws_route53_record" "this" {
  count = var.route53_zone_id == null ? 0 : 1

  zone_id = var.route53_zone_id
  name    = var.domain_name
  type    = "A"

  alias {
    name                   = aws_lb.this.dns_name
    zone_id                = aws_lb.this.zone_id
    evaluate_target_health = false
  }
}

# -- data: the store in an encrypted RDS PostgreSQL; everything else the task keeps is a cache ----

resource "aws_db_subnet_group" "this" {
  name       = var.name
  subnet_ids = var.private_subnet_ids
  tags       = local.tags
}

resource "aws_db_instance" "this" {
  identifier                    = var.name
  engine                        = "postgres"
  engine_version                = "16"
  instance_class                = var.db_instance_class
  allocated_storage             = var.db_allocated_storage
  storage_encrypted             = true
  kms_key_id                    = var.kms_key_arn
  db_name                       = "deploybot"
  username                      = "deploybot"
  manage_master_user_password   = true
  master_user_secret_kms_key_id = var.kms_key_arn
  db_subnet_group_name          = aws_db_subnet_group.this.name
  vpc_security_group_ids        = [aws_security_group.db.id]
  publicly_accessible           = false
  multi_az                      = var.db_multi_az
  backup_retention_period       = var.db_backup_retention_days
  deletion_protection           = var.deletion_protection
  skip_final_snapshot           = false
  final_snapshot_identifier     = "${var.name}-final"
  copy_tags_to_snapshot         = true
  auto_minor_version_upgrade    = true
  tags                          = local.tags
}

# -- secrets and logs -----------------------------------------------------------------------

resource "aws_secretsmanager_secret" "this" {
  for_each = local.enabled_secrets

  name                    = "${var.name}/${each.key}"
  description             = "${each.value.description}, for deploybot (${each.value.env})"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_cloudwatch_log_group" "this" {
  name              = "/ecs/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = local.tags
}

# -- ECS ------------------------------------------------------------------------------------

resource "aws_ecs_cluster" "this" {
  name = var.name
  tags = local.tags

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_task_definition" "this" {
  family                   = var.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.cpu
  memory                   = var.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn
  container_definitions    = jsonencode([local.container])
  tags                     = local.tags

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "data" # task storage: caches only (mirrors, working dirs); the store is in RDS
  }

  ephemeral_storage {
    size_in_gib = var.ephemeral_storage_gib
  }

  volume {
    name = "tmp" # task storage for /tmp: the root file system is read-only
  }
}

# Several tasks on one PostgreSQL store: any of them takes any webhook, claims jobs with
# row locks and takes over what a dead one held after its lease. A deployment starts the new
# tasks before it stops the old ones (100% stay healthy), so webhooks are never refused.
resource "aws_ecs_service" "this" {
  name                               = var.name
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.this.arn
  desired_count                      = var.replicas
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST" # ephemeral storage above 20 GiB needs 1.4.0 or later
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  health_check_grace_period_seconds  = 60
  enable_execute_command             = false
  propagate_tags                     = "SERVICE"
  tags                               = local.tags

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.task.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.this.arn
    container_name   = local.container_name
    container_port   = var.container_port
  }

  depends_on = [aws_lb_listener_rule.deploybot, aws_db_instance.this]
}

# -- IAM: the execution role starts the tasks; the bot's task role may do nothing; the plan
# -- and apply roles are the task roles of the plan and apply runners.

data "aws_iam_policy_document" "execution_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "execution" {
  name               = "${var.name}-execution"
  description        = "ECS starts deploybot's task with it: pulls the image, reads its secrets, writes its logs"
  assume_role_policy = data.aws_iam_policy_document.execution_trust.json
  tags               = local.tags
}

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "WriteLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.this.arn}:*"]
  }

  statement {
    sid     = "ReadTheContainersSecrets" # the bot's, the database's password, and the runners' tokens
    actions = ["secretsmanager:GetSecretValue"]
    resources = sort(concat([for name, arn in local.container_secrets : arn if name != "PGPASSWORD"],
    [local.database_secret_arn], [for secret in aws_secretsmanager_secret.runner_token : secret.arn]))
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "DecryptTheSecrets"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
    }
  }

  dynamic "statement" {
    for_each = local.ecr_repository_arn == null ? [] : [local.ecr_repository_arn]
    content {
      sid       = "PullTheImage"
      actions   = ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
      resources = [statement.value]
    }
  }

  dynamic "statement" {
    for_each = local.ecr_repository_arn == null ? [] : [1]
    content {
      sid       = "LogInToEcr"
      actions   = ["ecr:GetAuthorizationToken"]
      resources = ["*"] # the action has no resource to scope it to
    }
  }
}

resource "aws_iam_role_policy" "execution" {
  name   = "start-deploybot"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

data "aws_iam_policy_document" "task_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:*"]
    }
  }
}

resource "aws_iam_role" "task" {
  name               = "${var.name}-task"
  description        = "deploybot itself: no permissions at all (terraform runs in the runners)"
  assume_role_policy = data.aws_iam_policy_document.task_trust.json
  tags               = local.tags
}

# Plan: read-only, and never secret values. A plan runs code from the pull request
# (providers, data sources), so these credentials must be safe in hostile hands. It is the
# task role of the plan pool's runners, and of nothing else.
resource "aws_iam_role" "plan" {
  name                 = "${var.name}-plan"
  description          = "terraform plan, run by deploybot's plan runners: read-only"
  assume_role_policy   = data.aws_iam_policy_document.task_trust.json
  max_session_duration = 3600
  permissions_boundary = var.role_permissions_boundary_arn
  tags                 = local.tags
}

resource "aws_iam_role_policy_attachment" "plan" {
  count = length(local.plan_role_policy_arns)

  role       = aws_iam_role.plan.name
  policy_arn = local.plan_role_policy_arns[count.index]
}

data "aws_iam_policy_document" "plan_guardrails" {
  statement {
    sid       = "NoSecretValues"
    effect    = "Deny"
    actions   = var.plan_role_denied_actions
    resources = ["*"]
  }

  dynamic "statement" {
    for_each = length(var.state_lock_table_arns) > 0 ? [1] : []
    content {
      sid       = "TakeTheStateLock"
      actions   = ["dynamodb:DescribeTable", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem"]
      resources = var.state_lock_table_arns
    }
  }

  dynamic "statement" {
    for_each = length(var.state_lockfile_arns) > 0 ? [1] : []
    content {
      sid       = "TakeTheStateLockFile"
      actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
      resources = var.state_lockfile_arns
    }
  }
}

resource "aws_iam_role_policy" "plan_guardrails" {
  name   = "deploybot-plan-guardrails"
  role   = aws_iam_role.plan.id
  policy = data.aws_iam_policy_document.plan_guardrails.json
}

# Apply: what deploys may change (your policies), never deploybot itself. The task role of
# the apply pool's runners.
resource "aws_iam_role" "apply" {
  name                 = "${var.name}-apply"
  description          = "terraform apply, run by deploybot's apply runners after an authorized approval or merge"
  assume_role_policy   = data.aws_iam_policy_document.task_trust.json
  max_session_duration = 3600
  permissions_boundary = var.role_permissions_boundary_arn
  tags                 = local.tags
}

resource "aws_iam_role_policy_attachment" "apply" {
  count = length(var.apply_role_policy_arns)

  role       = aws_iam_role.apply.name
  policy_arn = var.apply_role_policy_arns[count.index]
}

data "aws_iam_policy_document" "apply_guardrails" {
  statement {
    sid     = "LeaveDeploybotsRolesAlone"
    effect  = "Deny"
    actions = ["iam:*"]
    resources = [
      aws_iam_role.execution.arn,
      aws_iam_role.task.arn,
      aws_iam_role.plan.arn,
      aws_iam_role.apply.arn,
    ]
  }

  statement {
    sid       = "LeaveDeploybotsServiceAlone"
    effect    = "Deny"
    actions   = ["ecs:*"]
    resources = [aws_ecs_cluster.this.arn, aws_ecs_service.this.id]
  }

  statement {
    sid       = "LeaveDeploybotsTasksAlone"
    effect    = "Deny"
    actions   = ["ecs:*"]
    resources = ["*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [aws_ecs_cluster.this.arn]
    }
  }

  statement {
    sid       = "LeaveDeploybotsDatabaseAlone"
    effect    = "Deny"
    actions   = ["rds:*"]
    resources = [aws_db_instance.this.arn, aws_db_subnet_group.this.arn]
  }

  statement {
    sid       = "LeaveDeploybotsLogsAlone"
    effect    = "Deny"
    actions   = ["logs:DeleteLogGroup", "logs:DeleteLogStream", "logs:PutRetentionPolicy", "logs:DeleteRetentionPolicy"]
    resources = [aws_cloudwatch_log_group.this.arn, "${aws_cloudwatch_log_group.this.arn}:*"]
  }

  dynamic "statement" {
    for_each = length(local.module_secret_arns) > 0 ? [1] : []
    content {
      sid       = "LeaveDeploybotsSecretsAlone"
      effect    = "Deny"
      actions   = ["secretsmanager:*"]
      resources = local.module_secret_arns
    }
  }
}

resource "aws_iam_role_policy" "apply_guardrails" {
  name   = "deploybot-apply-guardrails"
  role   = aws_iam_role.apply.id
  policy = data.aws_iam_policy_document.apply_guardrails.json
}
