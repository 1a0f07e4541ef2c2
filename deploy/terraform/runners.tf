# -- runners: one ECS service of ephemeral runners per pool. Each task claims one job
# -- (`deploybot runner --once`), runs it and exits, and ECS starts a fresh one: no job sees
# -- another's files. The plan pool's task role is the read-only plan role, the apply pool's
# -- the deploy role; the bot itself holds no AWS credentials that reach the account.

locals {
  runner_pools = {
    plan  = { role_arn = aws_iam_role.plan.arn, count = var.plan_runner_count }
    apply = { role_arn = aws_iam_role.apply.arn, count = var.apply_runner_count }
  }
}

# Filled by you with `deploybot runner-token create --pool <pool>` (its value never passes
# through Terraform or its state).
resource "aws_secretsmanager_secret" "runner_token" {
  for_each = local.runner_pools

  name                    = "${var.name}/runner-token-${each.key}"
  description             = "The ${each.key} pool's runner token, for deploybot runners (DEPLOYBOT_RUNNER_TOKEN)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_security_group" "runner" {
  name        = "${var.name}-runner"
  description = "deploybot runners: nothing in; out to HTTPS only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-runner" })
}

resource "aws_vpc_security_group_egress_rule" "runner_https" {
  for_each = toset(var.task_egress_cidrs)

  security_group_id = aws_security_group.runner.id
  description       = "HTTPS: deploybot, AWS APIs, Terraform providers"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "runner_to_alb" {
  security_group_id            = aws_security_group.runner.id
  description                  = "The runner API, through deploybot's load balancer"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.alb.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "alb_from_runners" {
  security_group_id            = aws_security_group.alb.id
  description                  = "HTTPS from deploybot's runners"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.runner.id
  tags                         = local.tags
}

resource "aws_ecs_task_definition" "runner" {
  for_each = local.runner_pools

  family                   = "${var.name}-runner-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.runner_cpu
  memory                   = var.runner_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = each.value.role_arn
  tags                     = local.tags
  container_definitions = jsonencode([{
    name                   = "runner"
    image                  = var.container_image
    essential              = true
    user                   = "${local.uid}:${local.uid}"
    readonlyRootFilesystem = true
    # Fargate allows no user namespaces, so no bubblewrap: the single-use task is the sandbox.
    command = ["runner", "--server", local.public_url, "--pool", each.key, "--once", "--sandbox", "none",
    "--work-dir", "/tmp"]
    environment = [
      { name = "AWS_REGION", value = local.region },
      { name = "AWS_STS_REGIONAL_ENDPOINTS", value = "regional" },
      { name = "TMPDIR", value = "/tmp" },
    ]
    secrets         = [{ name = "DEPLOYBOT_RUNNER_TOKEN", valueFrom = aws_secretsmanager_secret.runner_token[each.key].arn }]
    mountPoints     = [{ sourceVolume = "tmp", containerPath = "/tmp", readOnly = false }]
    linuxParameters = { capabilities = { drop = ["ALL"] } }
    stopTimeout     = 120
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.this.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "runner-${each.key}"
      }
    }
  }])

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "tmp" # task storage for the checkout and terraform's files: the root file system is read-only
  }
}

resource "aws_ecs_service" "runner" {
  for_each = local.runner_pools

  name                               = "${var.name}-runner-${each.key}"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.runner[each.key].arn
  desired_count                      = each.value.count
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  enable_execute_command             = false
  propagate_tags                     = "SERVICE"
  tags                               = local.tags

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.runner.id]
    assign_public_ip = false
  }
}
